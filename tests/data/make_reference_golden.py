"""Regenerate tests/data/reference_golden/ by running the PyTorch reference's own beam search.

Needs a checkout of https://github.com/apple/ml-recurrent-drafter (commit bd8586bb9bbf was used)
and a Python with torch, transformers and safetensors; neither is a specdraft dependency:

    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch transformers safetensors
    /tmp/refvenv/bin/python tests/data/make_reference_golden.py /path/to/ml-recurrent-drafter

Only the reference's `configuration_drafter.py` and `modeling_drafter.py` are imported (its
package `__init__` pulls in the whole LLM stack). For each case this writes the drafter exactly
as the reference saves it (`save_pretrained`: config.json + model.safetensors) and `golden.
safetensors` with the inputs (embed, prompt_state, init_token) and the reference's outputs
(beams [B, W, L+1], log_probs [B, W, L, V]).
"""

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "reference_golden"
# (name, hidden D, exit_dim E, ResBlocks, vocab V, beam width W, beam length L+1).
# V > 50 so the reference's top-50 mask matters; "noproj" has 2D == E (no input projection).
CASES = [
    ("proj", 8, 24, 2, 64, 4, 4),
    ("noproj", 8, 16, 1, 80, 5, 3),
]
BATCH = 2


def import_reference(checkout: Path):
    """Import the two reference modules as package `recurrent_drafting` from a stub folder."""
    stub = Path(tempfile.mkdtemp()) / "recurrent_drafting"
    stub.mkdir()
    (stub / "__init__.py").write_text("")
    for name in ("configuration_drafter.py", "modeling_drafter.py"):
        shutil.copy(checkout / "recurrent_drafting" / name, stub / name)
    sys.path.insert(0, str(stub.parent))
    spec = importlib.util.find_spec("recurrent_drafting.modeling_drafter")
    assert spec is not None and str(stub) in str(spec.origin), spec
    from recurrent_drafting import configuration_drafter, modeling_drafter

    return configuration_drafter, modeling_drafter


def make_case(cfg_mod, model_mod, name, d, e, n, v, w, length):
    torch.manual_seed(1234 + d + e + n + v)
    cfg = cfg_mod.DrafterConfig(
        vocab_size=v, hidden_size=d, exit_dim=e, num_draft_layers=n, rnn=True
    )
    drafter = model_mod.Drafter(cfg).eval()
    with torch.no_grad():
        # Larger-than-default weights so distributions are peaked and beams disagree.
        for p in drafter.parameters():
            p.mul_(3.0)
    embeddings = torch.nn.Embedding(v, d)
    prompt_state = torch.randn(BATCH, d)
    init_token = torch.randint(0, v, (BATCH,), dtype=torch.long)
    with torch.no_grad():
        beams, log_probs = drafter.beam_search_candidates(
            prompt_state, init_token, embeddings, model_mod.BeamShape(w, length)
        )
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    drafter.save_pretrained(folder, safe_serialization=True)
    tensors = {
        "embed": embeddings.weight.detach(),
        "prompt_state": prompt_state,
        "init_token": init_token,
        "beams": beams,
        "log_probs": log_probs,
    }
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(folder / "golden.safetensors"))
    print(name, "beams", beams.shape, "log_probs", log_probs.shape)


def main():
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} /path/to/ml-recurrent-drafter")
    cfg_mod, model_mod = import_reference(Path(sys.argv[1]))
    for case in CASES:
        make_case(cfg_mod, model_mod, *case)


if __name__ == "__main__":
    main()
