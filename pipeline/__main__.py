"""`python -m pipeline`: the same command line as `specdraft`.

An entry point, not library code: the full CLI lives in the top layer (`cluster.cli`) because
`generate --local/--address` needs Ray. Library modules of `pipeline` never import `cluster`.
"""

from cluster.cli import main

if __name__ == "__main__":
    main()
