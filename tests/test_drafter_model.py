"""The ReDrafter model: config validation, forward pass against an independent numpy version, tied
head, reduced vocabulary, reference logits and the import of PyTorch-reference weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from drafter import (
    BeamConfig,
    DrafterConfig,
    TargetEmbeddings,
    beam_search,
    check_target,
    draft_batch,
    draft_logits,
    init_params,
    load_reference,
    rnn_drafter,
    save_reference,
    with_draft_head,
)

D, V = 8, 96


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def torch_layout(params, config):
    """Our params -> the reference's torch Linear matrices ([out, in]) as float64 numpy, unsplit."""
    a = lambda x: np.asarray(x, np.float64)
    whole = lambda layer: np.concatenate([a(layer["w_llm"]), a(layer["w_rnn"])], axis=1)
    out = {
        "rnn_w": a(params["rnn"]["w"]),
        "rnn_u": a(params["rnn"]["u"]),
        "rnn_b": a(params["rnn"]["b"]),
        "blocks": [],
    }
    if config.has_input_proj:
        out["proj"] = (whole(params["input_proj"]), a(params["input_proj"]["b"]))
    for i, block in enumerate(params["res_blocks"]):
        w = whole(block) if i == 0 and not config.has_input_proj else a(block["w"])
        out["blocks"].append((w, a(block["b"])))
    if not config.tie_lm_head:
        out["head"] = a(params["lm_head"])  # [V_draft, E]
    return out


def np_step(torch_params, config, target, llm_state, rnn_state, token):
    """Hand-vectorized reference step: any leading axes. [..., D], [..., H], [...] target ids ->
    [..., H], [..., V_draft] log-probs, written from the paper's equations in float64."""
    p = torch_params
    embed = np.asarray(target.embed, np.float64)
    s = np_silu(embed[token] @ p["rnn_w"].T + rnn_state @ p["rnn_u"].T + p["rnn_b"])
    x = np.concatenate([np.broadcast_to(llm_state, s.shape[:-1] + llm_state.shape[-1:]), s], -1)
    if "proj" in p:
        x = x @ p["proj"][0].T + p["proj"][1]
    for w, b in p["blocks"]:
        x = x + np_silu(x @ w.T + b)
    if config.tie_lm_head:
        head = np.asarray(target.lm_head, np.float64)
        if target.vocab_map is not None:
            head = head[np.asarray(target.vocab_map)]
    else:
        head = p["head"]
    logits = x @ head.T
    if config.reference_logits:
        logits = logits - logits.max(-1, keepdims=True)
        kth = np.sort(logits, -1)[..., -min(50, logits.shape[-1])][..., None]
        logits = np.where(logits < kth, -50000.0, logits)
    return s, np_log_softmax(logits)


def make_target(config, key, vocab_map=None):
    k1, k2 = jax.random.split(key)
    embed = jax.random.normal(k1, (config.vocab_size, config.hidden_size))
    lm_head = jax.random.normal(k2, (config.vocab_size, config.hidden_size))
    return TargetEmbeddings(embed, lm_head if config.tie_lm_head else None, vocab_map)


CONFIGS = {
    "proj": DrafterConfig(D, V, exit_dim=24, num_draft_layers=2),
    "noproj": DrafterConfig(D, V, exit_dim=2 * D, num_draft_layers=2),
    "noproj_noblocks": DrafterConfig(D, V, exit_dim=2 * D, num_draft_layers=0),
    "tied": DrafterConfig(D, V, exit_dim=D, num_draft_layers=1, tie_lm_head=True),
    "reduced": DrafterConfig(D, V, exit_dim=24, num_draft_layers=1, draft_vocab_size=20),
    "reduced_tied": DrafterConfig(D, V, exit_dim=D, tie_lm_head=True, draft_vocab_size=20),
    "reference_logits": DrafterConfig(D, V, exit_dim=24, reference_logits=True),
}


def vocab_map_for(config, seed=0):
    if config.draft_vocab_size is None:
        return None
    return jnp.asarray(np.random.default_rng(seed).permutation(V)[: config.draft_vocab_size])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rnn_drafter_matches_numpy(name):
    config = CONFIGS[name]
    params = init_params(config, jax.random.key(1))
    target = make_target(config, jax.random.key(2), vocab_map_for(config))
    rng = np.random.default_rng(3)
    llm_state, rnn_state = rng.normal(size=D), rng.normal(size=D)
    step = jax.jit(rnn_drafter, static_argnums=1)
    new_state, log_probs = step(
        params,
        config,
        target,
        jnp.asarray(llm_state, jnp.float32),
        jnp.asarray(rnn_state, jnp.float32),
        jnp.int32(5),
    )
    want_state, want = np_step(
        torch_layout(params, config), config, target, llm_state, rnn_state, 5
    )
    assert log_probs.shape == (config.draft_vocab,)
    np.testing.assert_allclose(new_state, want_state, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_probs, want, rtol=1e-4, atol=1e-4)


def test_reference_logits_keep_exactly_top_50():
    config = CONFIGS["reference_logits"]
    params = init_params(config, jax.random.key(4))
    target = make_target(config, jax.random.key(5))
    _, log_probs = rnn_drafter(params, config, target, jnp.ones(D), jnp.zeros(D), jnp.int32(1))
    lse = jax.nn.logsumexp(jnp.where(log_probs > -1000, log_probs, -jnp.inf))
    assert abs(float(lse)) < 1e-5  # the 50 kept tokens carry all the mass
    assert int(jnp.sum(log_probs > -1000)) == 50
    masked = log_probs[log_probs < -1000]
    np.testing.assert_allclose(masked, masked[0])  # all masked entries share one value


def test_tied_head_has_no_own_head_and_reads_the_targets():
    config = CONFIGS["tied"]
    params = init_params(config, jax.random.key(6))
    assert "lm_head" not in params
    target = make_target(config, jax.random.key(7))
    s = jnp.linspace(-1, 1, D)
    logits = draft_logits(params, config, target, jnp.ones(D), s)
    scaled = target._replace(lm_head=target.lm_head * 2.0)
    np.testing.assert_allclose(
        draft_logits(params, config, scaled, jnp.ones(D), s), 2 * logits, rtol=1e-5
    )


def test_reduced_vocab_head_size():
    config = CONFIGS["reduced"]
    params = init_params(config, jax.random.key(8))
    assert params["lm_head"].shape == (20, 24)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"exit_dim": -1}, "exit_dim"),
        ({"num_draft_layers": -1}, "num_draft_layers"),
        ({"tie_lm_head": True}, "exit_dim"),
        ({"draft_vocab_size": V + 1}, "draft_vocab_size"),
        ({"draft_vocab_size": 0}, "draft_vocab_size"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    base = {"hidden_size": D, "vocab_size": V, "exit_dim": 24}
    with pytest.raises(ValueError, match=f"DrafterConfig.{field}"):
        DrafterConfig(**{**base, **kwargs})


def test_beam_config_errors_name_the_field():
    with pytest.raises(ValueError, match="BeamConfig.width"):
        BeamConfig(0, 3)
    with pytest.raises(ValueError, match="BeamConfig.length"):
        BeamConfig(2, 0)


def test_check_target_names_the_field():
    config = CONFIGS["reduced_tied"]
    good = make_target(config, jax.random.key(9), vocab_map_for(config))
    check_target(config, good)
    with pytest.raises(ValueError, match="embed"):
        check_target(config, good._replace(embed=jnp.zeros((V, D + 1))))
    with pytest.raises(ValueError, match="lm_head"):
        check_target(config, good._replace(lm_head=None))
    with pytest.raises(ValueError, match="vocab_map"):
        check_target(config, good._replace(vocab_map=jnp.arange(3)))
    with pytest.raises(ValueError, match="vocab_map"):
        check_target(CONFIGS["proj"], TargetEmbeddings(good.embed, None, jnp.arange(3)))


def test_gathered_draft_head_drafts_the_same():
    """The engine gathers a tied, reduced head once (`with_draft_head`): same logits and beams."""
    config = CONFIGS["reduced_tied"]
    params = init_params(config, jax.random.key(10))
    target = make_target(config, jax.random.key(11), vocab_map_for(config))
    gathered = with_draft_head(config, target)
    assert gathered.draft_head.shape == (20, D)
    state = jnp.linspace(-1, 1, D)
    np.testing.assert_array_equal(
        draft_logits(params, config, gathered, state, state),
        draft_logits(params, config, target, state, state),
    )
    beams = lambda t: beam_search(params, config, t, state, jnp.int32(3), BeamConfig(3, 4))
    for got, want in zip(beams(gathered), beams(target), strict=True):
        np.testing.assert_array_equal(got, want)
    # A wrong table is caught by name (drafting would otherwise read the wrong rows).
    with pytest.raises(ValueError, match="draft_head"):
        check_target(config, gathered._replace(draft_head=target.lm_head))
    with pytest.raises(ValueError, match="draft_head"):
        check_target(CONFIGS["tied"], gathered._replace(vocab_map=None))
    # Nothing to gather without both a tied head and a reduced vocabulary.
    for name in ("tied", "reduced"):
        plain = make_target(CONFIGS[name], jax.random.key(12), vocab_map_for(CONFIGS[name]))
        assert with_draft_head(CONFIGS[name], plain).draft_head is None


def test_transposed_draft_head_drafts_the_same():
    """`with_draft_head(..., transposed=True)` holds the rows as [D, K] (`draft_head_t`), for
    drafting many rows at once: the same beams for one prompt and for a batch, within fp32 sums
    in another order for the log-probabilities; wrong shapes and both layouts at once are named."""
    config = CONFIGS["reduced_tied"]
    params = init_params(config, jax.random.key(10))
    target = make_target(config, jax.random.key(11), vocab_map_for(config))
    rows, cols = with_draft_head(config, target), with_draft_head(config, target, transposed=True)
    assert cols.draft_head is None and cols.draft_head_t.shape == (D, 20)
    np.testing.assert_array_equal(cols.draft_head_t, rows.draft_head.T)
    states = jnp.asarray(np.random.default_rng(3).normal(size=(4, D)), jnp.float32)
    tokens = jnp.asarray([3, 0, 7, 3], jnp.int32)
    for beam in (BeamConfig(1, 4), BeamConfig(3, 4)):
        want = draft_batch(params, config, rows, states, tokens, beam)
        got = draft_batch(params, config, cols, states, tokens, beam)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.token_log_probs, want.token_log_probs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="draft_head_t"):
        check_target(config, cols._replace(draft_head_t=rows.draft_head))
    with pytest.raises(ValueError, match="not both"):
        check_target(config, cols._replace(draft_head=rows.draft_head))
    plain = make_target(CONFIGS["tied"], jax.random.key(12), vocab_map_for(CONFIGS["tied"]))
    assert with_draft_head(CONFIGS["tied"], plain, transposed=True).draft_head_t is None


# --- PyTorch-reference weights ---------------------------------------------------------------


def write_reference(folder, d, e, n, v, rnn=True, seed=0, drop=None, extra=None):
    """Write a drafter folder by hand with the reference's tensor names and torch layouts."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)
    tensors = {"rnn_w.weight": f(d, d), "rnn_u.weight": f(d, d), "rnn_u.bias": f(d)}
    if 2 * d != e:
        tensors |= {"input_proj.weight": f(e, 2 * d), "input_proj.bias": f(e)}
    for i in range(n):
        tensors |= {f"lm_head.{i}.linear.weight": f(e, e), f"lm_head.{i}.linear.bias": f(e)}
    tensors[f"lm_head.{n}.weight"] = f(v, e)
    tensors.pop(drop, None)
    tensors |= extra or {}
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = {
        "model_type": "recurrent_drafting_drafter",
        "vocab_size": v,
        "hidden_size": d,
        "exit_dim": e,
        "num_draft_layers": n,
        "rnn": rnn,
        "num_lookback_tokens": -1,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return tensors


def torch_forward(t, llm_state, rnn_state, token, embed, n):
    """The reference's Drafter math on its own tensors (torch Linear: x @ W.T + b)."""
    s = np_silu(
        embed[token] @ t["rnn_w.weight"].T + rnn_state @ t["rnn_u.weight"].T + t["rnn_u.bias"]
    )
    x = np.concatenate([llm_state, s])
    if "input_proj.weight" in t:
        x = x @ t["input_proj.weight"].T + t["input_proj.bias"]
    for i in range(n):
        x = x + np_silu(x @ t[f"lm_head.{i}.linear.weight"].T + t[f"lm_head.{i}.linear.bias"])
    return s, x @ t[f"lm_head.{n}.weight"].T


@pytest.mark.parametrize(("e", "n"), [(24, 2), (2 * D, 1)])
def test_import_reference_weights(tmp_path, e, n):
    tensors = write_reference(tmp_path, D, e, n, V)
    config, params = load_reference(tmp_path, reference_logits=False)
    assert config == DrafterConfig(D, V, e, n)
    np.testing.assert_array_equal(params["rnn"]["w"], tensors["rnn_w.weight"])
    np.testing.assert_array_equal(params["lm_head"], tensors[f"lm_head.{n}.weight"])
    first = params["input_proj"] if config.has_input_proj else params["res_blocks"][0]
    assert first["w_llm"].shape == first["w_rnn"].shape == (e, D)
    rng = np.random.default_rng(1)
    embed = rng.normal(size=(V, D)).astype(np.float32)
    llm_state, rnn_state = rng.normal(size=D), rng.normal(size=D)
    new_state, log_probs = rnn_drafter(
        params,
        config,
        TargetEmbeddings(jnp.asarray(embed)),
        jnp.asarray(llm_state, jnp.float32),
        jnp.asarray(rnn_state, jnp.float32),
        jnp.int32(7),
    )
    want_state, want_logits = torch_forward(tensors, llm_state, rnn_state, 7, embed, n)
    np.testing.assert_allclose(new_state, want_state, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(log_probs, np_log_softmax(want_logits), rtol=1e-3, atol=1e-3)


def test_import_reduced_vocab_keeps_mapped_rows(tmp_path):
    tensors = write_reference(tmp_path, D, 24, 1, V)
    vocab_map = np.array([5, 0, 17, 90])
    config, params = load_reference(tmp_path, vocab_map=vocab_map)
    assert config.draft_vocab_size == 4 and config.reference_logits
    np.testing.assert_array_equal(params["lm_head"], tensors["lm_head.1.weight"][vocab_map])


@pytest.mark.parametrize("name", ["proj", "noproj", "noproj_noblocks"])
def test_save_load_round_trip(tmp_path, name):
    config = CONFIGS[name]
    params = init_params(config, jax.random.key(10))
    save_reference(tmp_path, config, params)
    loaded_config, loaded = load_reference(tmp_path, reference_logits=False)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": "rnn_u.bias"}, "missing tensor rnn_u.bias"),
        ({"drop": "lm_head.1.weight"}, "missing tensor lm_head.1.weight"),
        ({"extra": {"rnn_w.bias": np.zeros(D, np.float32)}}, "unexpected tensor.*rnn_w.bias"),
        ({"rnn": False}, "field rnn"),
    ],
)
def test_import_errors_name_file_and_tensor(tmp_path, change, message):
    write_reference(tmp_path, D, 24, 1, V, **change)
    with pytest.raises(ValueError, match=message) as err:
        load_reference(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_import_wrong_shape_names_tensor(tmp_path):
    write_reference(tmp_path, D, 24, 1, V, extra={"input_proj.bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor input_proj.bias has shape"):
        load_reference(tmp_path)
