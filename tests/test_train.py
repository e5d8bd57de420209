"""Drafter training: the ReDrafter loss and its alignment, distillation data, resumable runs,
checkpoints, greedy-acceptance evaluation. Tiny shapes throughout (D = 16 or 32, V <= 96)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drafter import train as dtrain
from drafter.config import BeamConfig, DrafterConfig
from drafter.model import TargetEmbeddings, draft_logits, init_params, rnn_step
from pipeline import distill, llm
from pipeline.distill_eval import eval_walk
from pipeline.drafter_io import DrafterCheckpointError, load_drafter, save_drafter
from pipeline.prompts import PromptItem
from pipeline.train_run import RunSpec, fit

D, V, K, L = 16, 64, 32, 3


def _target(key, vocab_map=None):
    k1, k2 = jax.random.split(key)
    embed = jax.random.normal(k1, (V, D))
    return TargetEmbeddings(embed, jax.random.normal(k2, (V, D)), vocab_map)


def _windows(key, b, rule=False):
    """Random LLM states; tokens random or following x_{i+1} = (3 x_i + 1) mod V."""
    k1, k2 = jax.random.split(key)
    first = jax.random.randint(k2, (b,), 0, V)
    if rule:
        cols = [first]
        for _ in range(L):
            cols.append((3 * cols[-1] + 1) % V)
        tokens = jnp.stack(cols, axis=1)
    else:
        tokens = jax.random.randint(k2, (b, L + 1), 0, V)
    return dtrain.Window(jax.random.normal(k1, (b, D)), tokens.astype(jnp.int32),
                         jnp.ones((b, L), bool))  # fmt: skip


@pytest.mark.parametrize("tied,reduced", [(True, False), (False, True), (True, True)])
def test_window_loss_matches_a_hand_unrolled_rnn(tied, reduced):
    """Depth k consumes tokens[:k+1] (the LLM's token first) and predicts tokens[k+1]."""
    config = DrafterConfig(D, V, D if tied else 24, 1, tied, K if reduced else None)
    params = init_params(config, jax.random.key(0))
    vocab_map = jnp.arange(0, 2 * K, 2, dtype=jnp.int32) if reduced else None
    target = _target(jax.random.key(1), vocab_map)
    w = jax.tree.map(lambda x: x[0], _windows(jax.random.key(2), 1))
    if reduced:  # keep every label inside the draft vocabulary (even ids)
        w = w._replace(tokens=(w.tokens // 2) * 2)
    head = dtrain.head_weights(params, config, target)
    loss, ce, correct, valid = dtrain.window_loss(params, config, target, head, None, 0.0, w)
    state, expected = jnp.zeros(D), []
    for k in range(L):
        state = rnn_step(params, target.embed[w.tokens[k]], state)
        logp = jax.nn.log_softmax(draft_logits(params, config, target, w.llm_state, state))
        label = int(w.tokens[k + 1]) // 2 if reduced else int(w.tokens[k + 1])
        expected.append(-logp[label])
    np.testing.assert_allclose(ce, np.array(expected), rtol=1e-5)
    np.testing.assert_allclose(loss, ce)
    assert bool(valid.all())


def test_reduced_vocab_masks_labels_it_cannot_draft():
    vocab_map = jnp.array([5, 9, 2], jnp.int32)
    ids, inside = dtrain.draft_labels(jnp.array([9, 7, 2, 5]), vocab_map, 12)
    np.testing.assert_array_equal(inside, [True, False, True, True])
    np.testing.assert_array_equal(jnp.where(inside, ids, -1), [1, -1, 2, 0])


def test_kl_term_is_the_divergence_from_the_llm_over_the_draft_vocab():
    """loss = CE + w * KL(p_LLM || p_drafter), p_LLM = softmax(lm_head[vocab_map] @ h_{t+1+k})."""
    config = DrafterConfig(D, V, D, 1, True, K)
    params = init_params(config, jax.random.key(0))
    vocab_map = jnp.arange(K, dtype=jnp.int32) * 2
    target = _target(jax.random.key(1), vocab_map)
    w = jax.tree.map(lambda x: x[0], _windows(jax.random.key(2), 1))
    w = w._replace(tokens=(w.tokens // 2) * 2,
                   teacher_hidden=jax.random.normal(jax.random.key(3), (L, D)))  # fmt: skip
    head = dtrain.head_weights(params, config, target)
    loss, ce, _, _ = dtrain.window_loss(params, config, target, head, target.lm_head, 0.5, w)
    state, expected = jnp.zeros(D), []
    for k in range(L):
        state = rnn_step(params, target.embed[w.tokens[k]], state)
        q = jax.nn.log_softmax(draft_logits(params, config, target, w.llm_state, state))
        p = jax.nn.log_softmax(target.lm_head[vocab_map] @ w.teacher_hidden[k])
        expected.append(float(jnp.sum(jnp.exp(p) * (p - q))))
    np.testing.assert_allclose(loss - ce, 0.5 * np.array(expected), rtol=1e-4, atol=1e-5)
    assert min(expected) > 0


def test_a_few_steps_lower_the_loss():
    config = DrafterConfig(D, V, D, 1, True, K)
    target = _target(jax.random.key(1), jnp.arange(K, dtype=jnp.int32) * 2)
    train = dtrain.TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=40)
    optimizer = dtrain.make_optimizer(train)
    state = dtrain.init_state(init_params(config, jax.random.key(0)), optimizer)
    step = jax.jit(dtrain.make_train_step(config, train, optimizer))
    w = _windows(jax.random.key(2), 32, rule=True)
    w = w._replace(tokens=(w.tokens // 2) * 2)
    losses = []
    for _ in range(40):
        state, metrics = step(state, target, None, w, jax.random.key(0))
        losses.append(float(metrics.loss))
    assert int(state.step) == 40
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("warmup,total", [(2, 2), (0, 1), (3, 10)])
def test_schedule_warms_up_then_decays_even_when_warmup_takes_every_step(warmup, total):
    train = dtrain.TrainConfig(learning_rate=1e-2, warmup_steps=warmup, total_steps=total)
    params = {"w": jnp.ones(3)}
    optimizer = dtrain.make_optimizer(train)
    opt_state = optimizer.init(params)
    moved = []
    for _ in range(total):
        updates, opt_state = optimizer.update({"w": jnp.ones(3)}, opt_state, params)
        moved.append(float(jnp.abs(updates["w"]).max()))
    # AdamW's first step moves by lr(step) whatever the gradient's scale: 0 at step 0 of a warmup.
    assert (moved[0] == 0.0) == (warmup > 0)
    assert max(moved) > 0 and all(np.isfinite(moved))


def test_accepted_length_takes_the_best_beam_prefix():
    drafts = jnp.array([[7, 1, 2, 9], [7, 1, 3, 4], [7, 5, 5, 5]])
    assert int(dtrain.accepted_length(drafts, jnp.array([7, 1, 3, 4]))) == 3
    assert int(dtrain.accepted_length(drafts, jnp.array([7, 1, 2, 4]))) == 2
    assert int(dtrain.accepted_length(drafts, jnp.array([7, 6, 3, 4]))) == 0
    assert int(dtrain.accepted_length(drafts, jnp.array([7, 1, 3, -1]))) == 2


def _data(lengths, d=4):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    hidden = np.arange(n * d, dtype=np.float16).reshape(n, d)
    return distill.DistillData(np.arange(100, 100 + n, dtype=np.int32), hidden, offsets)


def test_windows_align_states_with_tokens_and_mask_the_answer_end():
    data = _data([5, 3])
    starts = distill.window_starts(data)
    np.testing.assert_array_equal(starts, [0, 1, 2, 3, 5, 6])  # last token of each has no label
    w = distill.gather_windows(data, np.array([3, 5]), length=3, teacher=True)
    np.testing.assert_array_equal(w.llm_state[:, 0], [12, 20])  # hidden[j] with d = 4
    np.testing.assert_array_equal(w.tokens[0, :2], [103, 104])
    np.testing.assert_array_equal(w.mask, [[True, False, False], [True, True, False]])
    np.testing.assert_array_equal(w.tokens[1, :3], [105, 106, 107])  # never crosses sequences
    np.testing.assert_array_equal(w.teacher_hidden[1, :2, 0], [24, 28])  # produced the labels


def test_batch_order_is_a_function_of_the_step():
    a = [distill.batch_indices(10, 3, s, seed=1) for s in range(6)]
    b = [distill.batch_indices(10, 3, s, seed=1) for s in range(6)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert len(set(np.concatenate(a[:3]).tolist())) == 9  # one epoch: no repeats
    assert not np.array_equal(a[0], distill.batch_indices(10, 3, 0, seed=2))


def test_frequency_vocab_keeps_frequent_tokens_and_eos():
    data = distill.DistillData(np.array([4, 4, 4, 7, 7, 9, 3], np.int32), np.zeros((7, 2)),
                               np.array([0, 7]))  # fmt: skip
    np.testing.assert_array_equal(distill.token_frequency_vocab(data, 3, always=(1,)), [1, 4, 7])


def test_eval_walk_counts_calls_and_the_bonus_token():
    answer = jnp.arange(10, 30, dtype=jnp.int32)  # 20 tokens
    hidden = jnp.arange(20, dtype=jnp.float32)[:, None]

    def oracle(h, tok):  # drafts the true next L tokens
        j = h[0].astype(jnp.int32)
        return (answer[jnp.minimum(j + jnp.arange(L + 1), 19)])[None]

    calls, tokens, hist = eval_walk(oracle, hidden, answer, jnp.int32(20), L)
    assert int(tokens) == 19  # every answer token after the first, none past the end
    assert int(calls) == 5  # 4 calls of L+1 = 4 tokens, then the last 3 in one call
    np.testing.assert_array_equal(hist, [0, 0, 1, 4])
    wrong = lambda h, tok: jnp.full((2, L + 1), -7, jnp.int32)
    calls, tokens, hist = eval_walk(wrong, hidden, answer, jnp.int32(12), L)
    assert (int(calls), int(tokens), int(hist[0])) == (11, 11, 11)


TINY = llm.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(1,))  # fmt: skip


class _Tok:
    def encode_chat(self, messages):
        return [3 + ord(c) % 90 for c in messages[-1]["content"]]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    params = llm.init_params(TINY, jax.random.key(0))
    items = [PromptItem(id=str(i), prompt=f"q{i} " * (1 + i % 3)) for i in range(12)]
    settings = distill.GenerationSettings(max_new_tokens=12, temperature=1.0, chunk_size=8)
    out = tmp_path_factory.mktemp("data")
    fp = distill.fingerprint_of("tiny", settings.as_dict())
    data = distill.build_split((params, TINY, _Tok()), items, out, "train", settings, fp)
    return params, items, settings, out, fp, data


def test_data_states_are_the_llm_states_that_produced_each_answer_token(tiny_data):
    params, items, settings, out, fp, data = tiny_data
    assert data.num_sequences == 12 and data.hidden_size == 32
    prompt = _Tok().encode_chat([{"role": "user", "content": items[4].prompt}])
    answer, hidden = data.sequence(4)
    full = jnp.asarray([prompt + answer.tolist()], jnp.int32)
    ref = distill.hidden_states(params, TINY, full, jnp.asarray([full.shape[1]]))[0]
    p = len(prompt)
    np.testing.assert_allclose(hidden, ref[p - 1 : p - 1 + len(answer)], atol=2e-2)


def test_greedy_data_states_produce_their_tokens_and_teach_the_labels():
    """With greedy answers, the LLM head on hidden[j] picks answer[j], so a window's teacher
    distributions (for the KL term) peak on its labels."""
    params = llm.init_params(TINY, jax.random.key(5))
    items = [PromptItem(id=str(i), prompt=f"greedy {i}") for i in range(3)]
    settings = distill.GenerationSettings(max_new_tokens=10, chunk_size=4)
    data = distill.answer_chunk(params, TINY, distill.encode_prompts(_Tok(), items), range(3),
                                settings)  # fmt: skip
    picked = np.argmax(np.asarray(llm.lm_logits(params, jnp.asarray(data.hidden, jnp.float32))), -1)
    assert (picked == data.answer).mean() >= 0.9  # fp16 storage may flip a near-tie
    w = distill.gather_windows(data, distill.window_starts(data), 3, teacher=True)
    taught = np.argmax(np.asarray(llm.lm_logits(params, jnp.asarray(w.teacher_hidden))), -1)
    assert (taught == w.tokens[:, 1:])[w.mask].mean() >= 0.9


def test_cached_chunks_are_reused_and_foreign_ones_refused(tiny_data, monkeypatch):
    params, items, settings, out, fp, data = tiny_data

    def no_generation(*args):
        raise AssertionError("regenerated a cached chunk")

    monkeypatch.setattr(distill, "answer_chunk", no_generation)
    again = distill.build_split((params, TINY, _Tok()), items, out, "train", settings, fp)
    np.testing.assert_array_equal(again.answer, data.answer)
    chunk = next(out.glob("train-*.npz"))
    stored = fp["temperature"]
    # The error names the setting that differs, with the cached and the asked-for value.
    with pytest.raises(ValueError, match=f"cached data .* temperature {stored} \\(now 0.5\\)"):
        distill.load_npz(chunk, {**fp, "temperature": 0.5})


SPEC = RunSpec(steps=6, batch=16, learning_rate=3e-3, warmup=1, width=3, length=3,
               draft_vocab_size=48, save_every=2, keep=2)  # fmt: skip


def _fit(tiny_data, out, spec=SPEC, config=TINY, eval_beams=()):
    params, *_, data = tiny_data
    return fit(spec, (params, config, "tiny"), data, data, out, eval_beams=eval_beams)


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    beams = (BeamConfig(1, 2), BeamConfig(SPEC.width, SPEC.length), BeamConfig(3, 3, tree=True))
    whole = _fit(tiny_data, tmp_path / "whole", eval_beams=beams)
    # The grid is evaluated like the main figure: the same beam gives the same figures.
    grid = whole.info["eval_grid"]
    assert [g["beam"] for g in grid] == [{"width": 1, "length": 2}, whole.info["eval"]["beam"],
                                         {"width": 3, "length": 3, "tree": True}]  # fmt: skip
    assert grid[1] == whole.info["eval"]
    assert grid[2]["mean_tokens_per_call"] >= 1 and len(grid[2]["per_depth_acceptance"]) == 3
    assert len(grid[0]["per_depth_acceptance"]) == 2
    real = distill.batch_indices
    seen = []

    def dies_at_step_5(n, batch, step, seed):
        if step == 5 and not seen:
            seen.append(step)
            raise KeyboardInterrupt
        return real(n, batch, step, seed)

    monkeypatch.setattr(distill, "batch_indices", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_data, tmp_path / "cut")
    steps = sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert steps == [2, 4]  # keep=2, saved every 2 steps; step 5 never finished
    resumed_steps = []

    def records_steps(n, batch, step, seed):
        resumed_steps.append(step)
        return real(n, batch, step, seed)

    monkeypatch.setattr(distill, "batch_indices", records_steps)
    resumed = _fit(tiny_data, tmp_path / "cut")
    assert resumed_steps == [4, 5]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 whole.params, resumed.params)  # fmt: skip
    assert resumed.info["eval"]["calls"] == whole.info["eval"]["calls"]


def test_resume_refuses_a_checkpoint_for_another_llm_or_settings(tiny_data, tmp_path):
    _fit(tiny_data, tmp_path, dataclasses.replace(SPEC, steps=2))
    with pytest.raises(DrafterCheckpointError, match="learning_rate: 0.003 -> 0.001"):
        _fit(tiny_data, tmp_path, dataclasses.replace(SPEC, steps=2, learning_rate=1e-3))
    other = dataclasses.replace(TINY, vocab_size=97)
    with pytest.raises(DrafterCheckpointError, match="vocab_size=96.*vocab_size=97"):
        params, *_, data = tiny_data
        bigger = {**params, "embed": jnp.zeros((97, 32))}
        fit(dataclasses.replace(SPEC, steps=2), (bigger, other, "tiny"), data, data, tmp_path)


def test_drafter_folder_round_trip_onto_a_mesh_and_mismatch_errors(tmp_path):
    from sharding.mesh import make_mesh, replicated

    config = DrafterConfig(D, V, D, 2, True, K)
    params = init_params(config, jax.random.key(0))
    vocab_map = np.arange(K, dtype=np.int32) * 2
    save_drafter(tmp_path / "d", config, params, vocab_map, {"eval": {"x": 1.5}})
    sharding = replicated(make_mesh())
    got = load_drafter(tmp_path / "d", TINY.__class__(**{**dataclasses.asdict(TINY),
                       "vocab_size": V, "hidden_size": D}), sharding)  # fmt: skip
    assert got.config == config and got.info["eval"] == {"x": 1.5}
    np.testing.assert_array_equal(got.vocab_map, vocab_map)
    jax.tree.map(np.testing.assert_array_equal, got.params, params)
    assert got.params["rnn"]["w"].sharding.is_equivalent_to(sharding, 2)
    with pytest.raises(DrafterCheckpointError, match="hidden_size=16.*hidden_size=32"):
        load_drafter(tmp_path / "d", dataclasses.replace(TINY, vocab_size=V))
    with pytest.raises(DrafterCheckpointError, match="vocab_size=64.*vocab_size=96"):
        load_drafter(tmp_path / "d", dataclasses.replace(TINY, hidden_size=D))


@pytest.mark.slow
def test_shipped_drafter_fits_smollm2_and_predicts_its_greedy_continuation():
    from drafter.drafting import beam_search
    from drafter.sampling import SamplingConfig
    from pipeline.drafter_io import DEFAULT_DRAFTER, target_embeddings
    from pipeline.generate import generate
    from pipeline.models import require_model
    from pipeline.tokenizer import Tokenizer
    from pipeline.weights import load_gguf

    path = require_model()
    config, params = load_gguf(path)
    shipped = load_drafter(DEFAULT_DRAFTER, config)
    assert shipped.config.tie_lm_head and shipped.config.hidden_size == config.hidden_size
    assert set(config.eos_token_ids) <= set(np.asarray(shipped.vocab_map).tolist())
    assert shipped.info["eval"]["mean_tokens_per_call"] > 1.5  # as measured when exported
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    ids = Tokenizer.from_gguf(path).encode_chat(messages)
    gen = generate(params, config, jnp.asarray([ids]), jnp.asarray([len(ids)]),
                   SamplingConfig(), jax.random.key(0), 24)  # fmt: skip
    answer = np.asarray(gen.tokens[0, : int(gen.lengths[0])])
    full = jnp.asarray([ids + answer.tolist()])
    hidden = distill.hidden_states(params, config, full, jnp.asarray([full.shape[1]]))[0]
    target = target_embeddings(params, shipped.config, jnp.asarray(shipped.vocab_map))
    accepted = []
    for j in range(len(answer) - 4):
        drafts = beam_search(shipped.params, shipped.config, target, hidden[len(ids) - 1 + j],
                             answer[j], BeamConfig(8, 3))  # fmt: skip
        accepted.append(int(dtrain.accepted_length(drafts.tokens, jnp.asarray(answer[j : j + 4]))))
    # An untrained drafter accepts ~nothing; the shipped one agrees with the LLM regularly.
    assert np.mean(accepted) > 0.5, accepted


def test_read_splits_limits_skips_empty_prompts_and_refuses_an_all_empty_split(tmp_path):
    from pipeline.prompts import PromptFileError

    train, heldout = tmp_path / "t.jsonl", tmp_path / "h.txt"
    rows = [{"id": "a", "prompt": "one"}, {"id": "e", "prompt": " "}, {"id": "b", "prompt": "two"}]
    train.write_text("".join(f'{{"id": "{r["id"]}", "prompt": "{r["prompt"]}"}}\n' for r in rows))
    heldout.write_text("three\n")
    splits = distill.read_splits((train, heldout), (1, None))
    assert [i.id for i in splits["train"]] == ["a"] and [i.id for i in splits["heldout"]] == ["1"]
    assert [r["id"] for r in splits["skipped"]["train"]] == ["e"]
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"id": "x", "prompt": ""}\n')
    with pytest.raises(PromptFileError, match=f"{blank}: no non-empty prompts for the heldout"):
        distill.read_splits((train, blank))
