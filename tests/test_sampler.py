"""Sampler semantics against hand-computed examples, and the engine's prompt logprobs (echo)
against a plain full-prompt forward."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from engine.sampler import Sampler  # noqa: E402
from scheduler.request import Request, SamplingParams  # noqa: E402

LOGITS = [1.0, 2.0, 3.0, 0.5, -1.0]


def req(rid="r", prompt=(0,), output=(), **sp) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**{"temperature": 0.0, **sp}), 0.0)
    r.output_token_ids = list(output)
    return r


def penalised(logits, request):
    return Sampler().apply_penalties(torch.tensor([logits]), [request])[0].tolist()


def test_presence_and_frequency_penalty_openai_semantics():
    # output counts: token 0 once, token 2 twice; prompt tokens (3) do not count for OpenAI's.
    r = req(prompt=[3, 3], output=[2, 2, 0], presence_penalty=0.5, frequency_penalty=0.25)
    assert penalised(LOGITS, r) == pytest.approx([1 - 0.25 - 0.5, 2.0, 3 - 0.5 - 0.5, 0.5, -1.0])
    neg = req(output=[4], presence_penalty=-1.0, frequency_penalty=-2.0)  # negative encourages
    assert penalised(LOGITS, neg) == pytest.approx([1.0, 2.0, 3.0, 0.5, -1.0 + 1.0 + 2.0])


def test_repetition_penalty_hf_semantics():
    # seen = prompt {3, 4} + output {2}: positive logits divided, negative multiplied.
    r = req(prompt=[3, 4], output=[2], repetition_penalty=2.0)
    assert penalised(LOGITS, r) == pytest.approx([1.0, 2.0, 1.5, 0.25, -2.0])
    out = Sampler()(torch.tensor([LOGITS]), [r])
    assert out.tokens == [1]  # greedy picks from the penalised logits
    assert Sampler()(torch.tensor([LOGITS]), [req(prompt=[3, 4], output=[2])]).tokens == [2]


def test_penalties_only_touch_their_rows():
    logits = torch.tensor([LOGITS, LOGITS, LOGITS])
    rows = [req("a"), req("b", output=[2], frequency_penalty=1.0),
            req("c", prompt=[1], repetition_penalty=4.0)]
    got = Sampler().apply_penalties(logits, rows).tolist()
    assert got[0] == LOGITS
    assert got[1] == pytest.approx([1.0, 2.0, 2.0, 0.5, -1.0])
    assert got[2] == pytest.approx([1.0, 0.5, 3.0, 0.5, -1.0])
    assert logits.tolist()[1] == LOGITS  # input untouched


def test_penalty_counts_follow_a_growing_output():
    sampler = Sampler()  # counts are cached per request and updated as the output grows
    r = req(prompt=[4], output=[2], frequency_penalty=1.0, repetition_penalty=2.0)
    first = sampler.apply_penalties(torch.tensor([LOGITS]), [r])[0].tolist()
    assert first == pytest.approx([1.0, 2.0, 1.5 - 1.0, 0.5, -2.0])
    r.output_token_ids += [2, 0]
    again = sampler.apply_penalties(torch.tensor([LOGITS]), [r])[0].tolist()
    assert again == pytest.approx([0.5 - 1.0, 2.0, 1.5 - 2.0, 0.5, -2.0])
    sampler.release("r")
    assert sampler.apply_penalties(torch.tensor([LOGITS]), [req(output=[1], presence_penalty=1.0)]
                                   )[0].tolist() == pytest.approx([1.0, 1.0, 3.0, 0.5, -1.0])


def test_min_p_drops_unlikely_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None, :]
    sampler = Sampler(seed=1)
    for min_p, allowed in [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0})]:
        seen = set()
        for i in range(200):
            r = req(f"x{min_p}-{i}", temperature=1.0, min_p=min_p)
            seen.update(sampler(logits, [r]).tokens)
        assert seen == allowed, (min_p, seen)


def test_top_k_and_top_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()[None, :]
    sampler = Sampler(seed=2)
    for kw, allowed in [({"top_k": 2}, {0, 1}), ({"top_p": 0.65}, {0, 1}), ({"top_p": 0.35}, {0})]:
        seen = set()
        for i in range(200):
            seen.update(sampler(logits, [req(f"k{i}", temperature=1.0, **kw)]).tokens)
        assert seen == allowed, (kw, seen)


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([LOGITS])
    r = req(prompt=[3], output=[2], repetition_penalty=3.0, logprobs=2)
    out = Sampler()(logits, [r])
    raw = torch.tensor(LOGITS).log_softmax(-1).tolist()
    token, lp, top = out.logprobs[0]
    assert token == out.tokens[0] == 1
    assert lp == pytest.approx(raw[1])
    assert [t for t, _ in top] == [2, 1] and [v for _, v in top] == pytest.approx([raw[2], raw[1]])
    assert math.isclose(sum(math.exp(v) for v in raw), 1.0, rel_tol=1e-5)
    assert Sampler()(logits, [req()]).logprobs == [None]
    zero = Sampler()(logits, [req(logprobs=0)]).logprobs[0]
    assert zero[0] == 2 and zero[2] == []


def test_seeded_sampling_is_independent_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    alone = [Sampler()(logits[1:2], [req("s", temperature=1.0, seed=7)]).tokens[0] for _ in range(1)]
    sampler = Sampler()
    batch = sampler(logits, [req("a", temperature=1.0), req("s", temperature=1.0, seed=7),
                             req("b", temperature=0.5)])
    assert batch.tokens[1] == alone[0]


# ---- engine: prompt logprobs over chunked prefill match a full forward ------------------------

def test_prompt_logprobs_match_full_forward(tiny_model_dir):
    from transformers import LlamaForCausalLM

    from engine.config import EngineConfig
    from engine.core import EngineCore
    from scheduler.config import SchedulerConfig

    cfg = EngineConfig(model_dir=str(tiny_model_dir), dtype="float32", num_kv_blocks=64,
                       scheduler=SchedulerConfig(token_budget=8, max_num_seqs=4, block_size=4,
                                                 max_model_len=128))
    engine = EngineCore(cfg)
    prompt = list(range(100, 123))  # 23 tokens: three chunks of 8
    engine.add_request("e", prompt, SamplingParams(max_tokens=2, temperature=0.0, logprobs=3,
                                                   prompt_logprobs=2))
    outputs = []
    for _ in range(20):
        outputs += engine.step()
        if outputs and outputs[-1].finish_reason:
            break
    first, last = outputs[0], outputs[-1]
    assert last.finish_reason == "length" and last.prompt_logprobs is None
    plp = first.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None

    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + first.new_token_ids])).logits[0].float().log_softmax(-1)
    for pos in range(1, len(prompt)):
        token, lp, top = plp[pos]
        assert token == prompt[pos]
        assert lp == pytest.approx(ref[pos - 1, token].item(), abs=1e-4)
        assert len(top) == 2 and top[0][1] == pytest.approx(ref[pos - 1].max().item(), abs=1e-4)
    token, lp, top = first.logprobs[0]
    assert token == first.new_token_ids[0] and len(top) == 3
    assert lp == pytest.approx(top[0][1]) and top[0][0] == token  # greedy = the most likely
    assert lp == pytest.approx(ref[len(prompt) - 1, token].item(), abs=1e-4)
