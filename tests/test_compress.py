"""Push/pull compression: codec round trips and error bounds, error feedback, DGC, refusal of corrupt payloads, the push plan."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from downpour.compress import CODECS, DGC, Codec, ErrorFeedback, PushCompressor, Shape, decode, decode_push, make_codec, pull_codec
from downpour.compress.plan import decode_pull, encode_pull, pull_request
from downpour.config import CodecName, CompressionConfig, PushCodecConfig
from downpour.errors import ProtocolError
from downpour.layout import make_layout


def vec(n: int, seed: int = 0) -> torch.Tensor:
    """Random values with no zeros, magnitudes spread over six decades (every sign is meaningful)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return sign * torch.exp(torch.empty(n).uniform_(-7, 7, generator=g))


def roundtrip(enc: Codec | ErrorFeedback | DGC, x: torch.Tensor, shape: Shape | None = None) -> torch.Tensor:
    """What the receiver gets from one encode by a codec or a wrapper."""
    p = enc.encode(x, shape)
    return decode(enc.name if isinstance(enc, Codec) else enc.codec.name, p.meta, p.tensors, x.numel())


def near(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """``a`` equals ``b`` to within the tolerances (a cheap torch.testing.assert_close)."""
    assert a.shape == b.shape and bool(((a - b).abs() <= atol + rtol * b.abs()).all()), f"off by {float((a - b).abs().max()):.3g}"


def bucket_max(x: torch.Tensor, size: int) -> torch.Tensor:
    """Each element's bucket's max |x|."""
    return torch.cat([c.abs().max().expand(c.numel()) for c in x.split(size)])


def sent_positions(codec: Codec, x: torch.Tensor) -> set[int]:
    return set(roundtrip(codec, x).nonzero().flatten().tolist())


# -- registry and round trips ----------------------------------------------------


def test_every_codec_name_in_the_config_has_a_registered_decoder():
    assert set(CODECS) == set(get_args(CodecName))
    for name, cls in CODECS.items():
        assert cls.name == name and cls.decode is not Codec.decode


@pytest.mark.parametrize(("name", "meta"), [(None, {}), (3, {}), ("zip", {}), ("TOPK", {}), ("none", []), ("int8", None)])
def test_decoding_an_unknown_codec_name_or_meta_that_is_not_a_mapping_is_a_protocol_error(name, meta):
    with pytest.raises(ProtocolError, match="unknown codec|mapping"):
        decode(name, meta, [torch.zeros(3)], 3)


@pytest.mark.parametrize("n", [1, 7, 512, 513, 5000])
@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_round_trips_into_float32_of_the_same_length(name, n):
    x = vec(n, seed=n)
    out = roundtrip(CODECS[name](), x)
    assert out.dtype == torch.float32 and out.shape == (n,) and bool(torch.isfinite(out).all())
    assert torch.equal(out, x) or not CODECS[name].lossless  # none is exact


# -- error bounds ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "bound"), [("fp16", 1e-3), ("bf16", 1e-2)])
def test_16_bit_floats_keep_the_relative_error_small(name, bound):
    x = vec(5000)  # magnitudes 1e-3..1e3: within fp16's normal range
    assert float(((roundtrip(CODECS[name](), x) - x).abs() / x.abs()).max()) < bound


def test_fp16_saturates_values_beyond_its_range_instead_of_sending_inf():
    big = torch.finfo(torch.float16).max
    assert torch.equal(roundtrip(CODECS["fp16"](), torch.tensor([1e6, -1e6, 1.0])), torch.tensor([big, -big, 1.0]))


@pytest.mark.parametrize("n", [100, 1013])
@pytest.mark.parametrize(("codec", "bound"), [  # as a fraction of the bucket's max |x|
    (lambda: CODECS["int8"](bucket=100), 1 / 127 / 2),  # round to nearest: half a step
    (lambda: CODECS["qsgd"](bits=8, bucket=100), 1 / 127),  # stochastic rounding: one level
    (lambda: CODECS["qsgd"](bits=4, bucket=100), 1 / 7),
], ids=["int8", "qsgd8", "qsgd4"])
def test_bucketed_quantizers_err_by_at_most_their_step_within_each_bucket(codec, bound, n):
    x = vec(n) * torch.linspace(0.01, 1, n)  # buckets of very different scales
    err = (roundtrip(codec(), x) - x).abs()
    assert bool((err <= bucket_max(x, 100) * bound * (1 + 1e-5)).all())


def test_onebit_decodes_to_the_sign_times_each_buckets_mean_magnitude():
    x = vec(1013)  # the last bucket holds 13 elements: its mean is over those 13
    means = torch.cat([c.abs().mean().expand(c.numel()) for c in x.split(100)])
    near(roundtrip(CODECS["onebit"](bucket=100), x), x.sign() * means)


def low_rank(rows: int, cols: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    return (torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)).flatten()


@pytest.mark.parametrize(("rows", "cols", "rank", "codec_rank"), [(30, 20, 3, 20), (12, 40, 3, 12), (25, 16, 1, 1)])
def test_powersgd_reconstructs_a_matrix_of_at_most_its_rank_after_two_calls(rows, cols, rank, codec_rank):
    m, codec = low_rank(rows, cols, rank), CODECS["powersgd"](rank=codec_rank)
    for _ in range(2):  # the second call starts from the first call's basis
        out = roundtrip(codec, m, Shape(cols))
    near(out, m, atol=1e-4, rtol=1e-4)


def test_powersgd_warm_start_converges_to_the_best_approximation_of_its_rank():
    g = torch.Generator().manual_seed(0)
    u, v = (torch.linalg.qr(torch.randn(rows, 20, generator=g)).Q for rows in (30, 20))
    s = torch.tensor([10.0, 8.0] + [0.8**i for i in range(18)])
    m, codec = ((u * s) @ v.T).flatten(), CODECS["powersgd"](rank=2)
    for _ in range(3):  # a cold start each call would stay about twice as far off
        out = roundtrip(codec, m, Shape(20))
    assert float((out - m).norm()) <= 1.01 * float(s[2:].norm())


def test_powersgd_factors_a_range_that_starts_inside_a_row():
    m = low_rank(10, 8, 8)[5:70]  # rows of 8; the range starts 5 elements into the first row
    near(roundtrip(CODECS["powersgd"](rank=8), m, Shape(8, 5)), m, atol=1e-4, rtol=1e-4)


# -- sparsifiers -----------------------------------------------------------------


@pytest.mark.parametrize(("n", "ratio"), [(1, 0.01), (7, 0.01), (513, 0.05), (5000, 0.013)])
def test_topk_sends_exactly_the_k_largest_magnitudes(n, ratio):
    x = vec(n)
    k = max(1, math.ceil(ratio * n))
    out = roundtrip(CODECS["topk"](ratio=ratio), x)
    largest = set(x.abs().argsort(descending=True)[:k].tolist())
    assert set(out.nonzero().flatten().tolist()) == largest
    assert torch.equal(out[list(largest)], x[list(largest)])


@pytest.mark.parametrize(("n", "width", "dtype"), [(65536, 16, torch.int16), (70000, 32, torch.int32)])
def test_topk_uses_16_bit_indices_up_to_65536_elements_and_32_bit_above(n, width, dtype):
    x = vec(n) / 1e4
    x[-1] = 1e6
    p = CODECS["topk"](ratio=1 / n).encode(x)
    assert p.meta["w"] == width and p.tensors[1].dtype == dtype
    out = decode("topk", p.meta, p.tensors, n)
    assert out[-1] == 1e6 and int(out.count_nonzero()) == 1


def test_randomk_decoder_redraws_the_positions_from_the_seed_and_each_encode_draws_new_ones():
    x, codec = vec(1000), CODECS["randomk"](ratio=0.05, seed=3)
    out = roundtrip(codec, x)
    sent = out != 0
    assert int(sent.sum()) == 50 and torch.equal(out[sent], x[sent])
    assert sent_positions(codec, x) != set(sent.nonzero().flatten().tolist())


@pytest.mark.parametrize("bits", [8, 4])
def test_qsgd_is_unbiased_the_mean_of_many_draws_approaches_x(bits):
    x = vec(96) / 100
    # 2000 copies of x in one vector: whole buckets each, so these are 2000 independent draws
    draws = roundtrip(CODECS["qsgd"](bits=bits, bucket=32, seed=1), x.repeat(2000)).view(2000, 96)
    single = float((draws[0] - x).abs().mean())
    assert single > 0 and float((draws.mean(0) - x).abs().mean()) < single / 5


# -- error feedback and DGC ------------------------------------------------------


def test_error_feedback_keeps_what_topk_did_not_send_and_sends_it_next():
    x = vec(200)
    ef = ErrorFeedback(CODECS["topk"](ratio=0.1), torch.zeros(200))
    sent = roundtrip(ef, x)
    near(ef.residual, x - sent)
    left = ef.residual.clone()
    again = roundtrip(ef, torch.zeros(200))
    at = again.nonzero().flatten()
    assert at.numel() == 20 and not bool(sent[at].any())
    near(again[at], left[at])


@pytest.mark.parametrize("name", sorted(CODECS))
def test_with_error_feedback_everything_sent_plus_the_residual_is_everything_pushed(name):
    ef = ErrorFeedback(CODECS[name](), torch.zeros(300))
    pushed, sent = torch.zeros(300), torch.zeros(300)
    for step in range(20):
        x = vec(300, seed=step) / 100
        pushed += x
        sent += roundtrip(ef, x)
    near(sent + ef.residual, pushed)


def test_error_feedback_around_none_sends_the_input_not_the_zeroed_residual():
    x = vec(64)
    ef = ErrorFeedback(CODECS["none"](), torch.zeros(64))
    p = ef.encode(x)
    assert torch.equal(p.tensors[0], x) and not bool(ef.residual.any())


def test_dgc_density_falls_exponentially_from_warmup_start_to_the_ratio_then_stays():
    dgc = DGC(CODECS["topk"](ratio=0.001), torch.zeros(2 * 4000), warmup_steps=4, warmup_start=0.25)
    d = [dgc.density(i) for i in range(8)]
    assert d[0] == pytest.approx(0.25) and d[4:] == [pytest.approx(0.001)] * 4
    assert all(a > b for a, b in zip(d, d[1:5]))
    assert [b / a for a, b in zip(d, d[1:5])] == [pytest.approx(d[1] / d[0])] * 4
    for i in range(6):  # the encoder really sends at that density
        assert int(roundtrip(dgc, vec(4000, seed=i)).count_nonzero()) == math.ceil(d[i] * 4000)


def test_dgc_masks_the_momentum_where_it_sent():
    x1, x2 = vec(500, seed=1), vec(500, seed=2)
    dgc = DGC(CODECS["topk"](ratio=0.1), torch.zeros(1000), momentum=0.9)
    s1 = roundtrip(dgc, x1)
    assert bool((dgc.u[s1 != 0] == 0).all()) and torch.equal(dgc.u[s1 == 0], x1[s1 == 0])
    near(dgc.v, x1 - s1)
    s2 = roundtrip(dgc, x2)
    never = (s1 == 0) & (s2 == 0)
    assert bool((dgc.u[s2 != 0] == 0).all())
    near(dgc.u[never], 0.9 * x1[never] + x2[never])


@pytest.mark.parametrize("norm", [10.0, 0.5])
def test_dgc_clips_each_gradients_norm_before_accumulating_it(norm):
    x = vec(300)
    x = x * (norm / float(x.norm()))
    before = x.clone()
    dgc = DGC(CODECS["topk"](ratio=0.1), torch.zeros(600), momentum=0.0, clip_norm=1.0)
    sent = roundtrip(dgc, x)
    near(sent + dgc.v, x / max(1.0, norm))
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", ["qsgd", "onebit", "none"])
def test_dgc_around_a_codec_without_a_ratio_is_refused(name):
    with pytest.raises(ValueError, match="ratio"):
        DGC(CODECS[name](), torch.zeros(20))


# -- corrupt payloads ------------------------------------------------------------

N = 10
H, I8, U8 = torch.float16, torch.int8, torch.uint8
BAD = {
    "none-no-tensors": ("none", {}, []),
    "none-two-tensors": ("none", {}, [torch.zeros(N), torch.zeros(N)]),
    "none-float64": ("none", {}, [torch.zeros(N, dtype=torch.float64)]),
    "none-short": ("none", {}, [torch.zeros(N - 1)]),
    "none-nan": ("none", {}, [torch.tensor([0.0] * 9 + [math.nan])]),
    "fp16-inf": ("fp16", {}, [torch.tensor([0.0] * 9 + [math.inf], dtype=H)]),
    "fp16-float32": ("fp16", {}, [torch.zeros(N)]),
    "bf16-long": ("bf16", {}, [torch.zeros(N + 1, dtype=torch.bfloat16)]),
    "topk-negative-index": ("topk", {"w": 32}, [torch.ones(1), torch.tensor([-1], dtype=torch.int32)]),
    "topk-index-n": ("topk", {"w": 32}, [torch.ones(1), torch.tensor([N], dtype=torch.int32)]),
    "topk-16-bit-index-n": ("topk", {"w": 16}, [torch.ones(1), torch.tensor([N], dtype=torch.int16)]),
    "topk-16-bit-index-wraps": ("topk", {"w": 16}, [torch.ones(1), torch.tensor([-1], dtype=torch.int16)]),
    "topk-width-8": ("topk", {"w": 8}, [torch.ones(1), torch.tensor([0], dtype=torch.int16)]),
    "topk-counts": ("topk", {"w": 32}, [torch.ones(2), torch.tensor([0], dtype=torch.int32)]),
    "topk-inf": ("topk", {"w": 32}, [torch.tensor([math.inf]), torch.tensor([0], dtype=torch.int32)]),
    "randomk-k-0": ("randomk", {"k": 0, "s": 1}, [torch.ones(0)]),
    "randomk-k-over-n": ("randomk", {"k": N + 1, "s": 1}, [torch.ones(N + 1)]),
    "randomk-no-seed": ("randomk", {"k": 1}, [torch.ones(1)]),
    "randomk-negative-seed": ("randomk", {"k": 1, "s": -1}, [torch.ones(1)]),
    "randomk-values-vs-k": ("randomk", {"k": 2, "s": 1}, [torch.ones(1)]),
    "qsgd-4-bit-level-8": ("qsgd", {"b": 4, "B": N}, [torch.tensor([0x88] * 4 + [0x80], dtype=U8), torch.ones(1)]),
    "qsgd-bits-3": ("qsgd", {"b": 3, "B": N}, [torch.zeros(N, dtype=I8), torch.ones(1)]),
    "qsgd-no-bits": ("qsgd", {"B": N}, [torch.zeros(N, dtype=I8), torch.ones(1)]),
    "qsgd-bucket-0": ("qsgd", {"b": 8, "B": 0}, [torch.zeros(N, dtype=I8), torch.ones(1)]),
    "qsgd-bucket-bool": ("qsgd", {"b": 8, "B": True}, [torch.zeros(N, dtype=I8), torch.ones(N)]),
    "qsgd-negative-scale": ("qsgd", {"b": 8, "B": N}, [torch.zeros(N, dtype=I8), -torch.ones(1)]),
    "qsgd-scales-vs-buckets": ("qsgd", {"b": 8, "B": 5}, [torch.zeros(N, dtype=I8), torch.ones(1)]),
    "qsgd-4-bit-bytes": ("qsgd", {"b": 4, "B": N}, [torch.zeros(N, dtype=U8), torch.ones(1)]),
    "qsgd-8-bit-as-uint8": ("qsgd", {"b": 8, "B": N}, [torch.zeros(N, dtype=U8), torch.ones(1)]),
    "onebit-bytes": ("onebit", {"B": N}, [torch.zeros(1, dtype=U8), torch.ones(1)]),
    "onebit-negative-scale": ("onebit", {"B": N}, [torch.zeros(2, dtype=U8), -torch.ones(1)]),
    "int8-no-bucket": ("int8", {}, [torch.zeros(N, dtype=I8), torch.ones(1)]),
    "int8-negative-scale": ("int8", {"B": N}, [torch.zeros(N, dtype=I8), -torch.ones(1)]),
    "int8-short": ("int8", {"B": N}, [torch.zeros(N - 1, dtype=I8), torch.ones(1)]),
    "powersgd-p-rows": ("powersgd", {"c": 5, "p": 0}, [torch.ones(3, 1), torch.ones(5, 1)]),
    "powersgd-q-rows": ("powersgd", {"c": 5, "p": 0}, [torch.ones(2, 1), torch.ones(4, 1)]),
    "powersgd-ranks": ("powersgd", {"c": 5, "p": 0}, [torch.ones(2, 1), torch.ones(5, 2)]),
    "powersgd-rank-0": ("powersgd", {"c": 5, "p": 0}, [torch.ones(2, 0), torch.ones(5, 0)]),
    "powersgd-vectors": ("powersgd", {"c": 5, "p": 0}, [torch.ones(2), torch.ones(5)]),
    "powersgd-pad-a-row": ("powersgd", {"c": 5, "p": 5}, [torch.ones(3, 1), torch.ones(5, 1)]),
    "powersgd-no-cols": ("powersgd", {"p": 0}, [torch.ones(2, 1), torch.ones(5, 1)]),
    "powersgd-nan": ("powersgd", {"c": 5, "p": 0}, [torch.ones(2, 1), torch.tensor([[math.nan]] * 5)]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_corrupt_payload_is_refused_with_a_protocol_error(case):
    name, meta, tensors = BAD[case]
    with pytest.raises(ProtocolError, match=f"codec {name}"):
        decode(name, meta, tensors, N)


def test_a_qsgd_8_bit_level_of_minus_128_is_refused():
    with pytest.raises(ProtocolError):
        decode("qsgd", {"b": 8, "B": 4}, [torch.tensor([-128, 0, 0, 0], dtype=I8), torch.ones(1)], 4)


def test_qsgd_never_flips_the_sign_of_a_buckets_largest_element():
    x = torch.full((1_000_000,), 0.464127779006958)  # 0.46412778 * (127 / 0.46412778) > 127 in float32
    assert bool((roundtrip(CODECS["qsgd"](bits=8), x) > 0).all())


def test_large_finite_values_are_not_mistaken_for_inf():
    x = torch.tensor([3e38, 3e38])
    assert torch.equal(decode("none", {}, [x], 2), x)


@pytest.mark.parametrize("name", ["int8", "qsgd"])
def test_a_bucket_of_tiny_values_keeps_its_error_bound(name):
    x = torch.full((4,), 1e-31)  # a normal float32
    err = (roundtrip(CODECS[name](bucket=4), x) - x).abs()
    assert bool((err <= 1e-31 / 127).all())


def test_decode_push_checks_the_enc_list_against_the_keys_and_tensors():
    p1, p2 = CODECS["none"]().encode(vec(N)), CODECS["int8"]().encode(vec(N))
    e1, e2, t1, t2 = ["none", p1.meta, 1], ["int8", p2.meta, 2], p1.tensors, p2.tensors
    near(decode_push([e1, e2], t1 + t2, [N, N])[:N], vec(N))
    for enc, tensors in [
        ([e1], t1 + t2),  # one entry for two keys
        (e1, t1),  # not a list of entries
        ([e1, [*e2[:2], 3]], t1 + t2),  # claims more tensors than exist
        ([e1, [*e2[:2], -1]], t1 + t2),
        ([[*e1[:2], True], e2], t1 + t2),  # a count that is not an int
        ([e1, e2[:2]], t1 + t2),
        ([e1, e2], t1 + t2 + [torch.zeros(1)]),  # a tensor left over
    ]:
        with pytest.raises(ProtocolError):
            decode_push(enc, tensors, [N, N])


@pytest.mark.parametrize("pq", [["topk", 64], ["zip", 64], ["int8", 0], ["int8", (1 << 24) + 1], ["int8", "64"], ["int8"], "int8", None])
def test_pull_codec_refuses_an_unknown_codec_or_a_bad_bucket(pq):
    with pytest.raises(ProtocolError):
        pull_codec(pq)


@pytest.mark.parametrize("pull", ["fp16", "int8"])
def test_a_pull_request_asks_for_a_codec_the_reply_is_encoded_and_decoded_with(pull):
    cfg = CompressionConfig(pull=pull, pull_block=64)
    assert pull_request(CompressionConfig()) is None
    x = vec(300) / 1000
    enc, tensors = encode_pull(pull_codec(pull_request(cfg)), x)
    near(decode_pull(enc, tensors, 300), x, atol=float(x.abs().max()) / 200, rtol=1e-2)
    with pytest.raises(ProtocolError):
        decode_pull([enc[0], enc[1], enc[2] + 1], tensors, 300)


# -- the push plan ---------------------------------------------------------------

LAYOUT = make_layout([("w", (64, 100)), ("b", (64,))], 2, max_slice_bytes=4096)
B_KEY = next(s.key for s in LAYOUT.slices if s.start >= 6400)


def codecs_per_key(cfg: CompressionConfig) -> list[str]:
    enc, _ = PushCompressor(cfg, LAYOUT).encode(list(range(len(LAYOUT.slices))), vec(LAYOUT.numel))
    return [e[0] for e in enc]


def test_groups_pick_the_codec_by_parameter_name_and_the_default_covers_the_rest():
    cfg = CompressionConfig(push={"codec": "topk", "error_feedback": True}, groups=[{"params": ["*b"], "push": {"codec": "none"}}])
    names = codecs_per_key(cfg)
    assert names[B_KEY] == "none" and names.count("topk") == len(LAYOUT.slices) - 1


def test_parameters_under_min_numel_are_sent_as_plain_float32():
    names = codecs_per_key(CompressionConfig(push={"codec": "qsgd", "min_numel": 100}))
    assert names[B_KEY] == "none" and names.count("qsgd") == len(LAYOUT.slices) - 1


def test_powersgd_falls_back_to_none_for_vectors_and_factors_keys_as_rows_of_their_matrix():
    cfg = CompressionConfig(push={"codec": "powersgd", "rank": 4})
    names = codecs_per_key(cfg)
    assert names[B_KEY] == "none" and names.count("powersgd") == len(LAYOUT.slices) - 1
    # w has rank 2; a key's range folded into w's own rows has rank <= 4 (its two partial rows
    # add one each), so rank 4 is exact; folded at the wrong offset its rank would be far higher
    comp, x = PushCompressor(cfg, LAYOUT), torch.cat([low_rank(64, 100, 2), vec(64)])
    keys = [s.key for s in LAYOUT.server_slices(1)]
    enc, tensors = comp.encode(keys, x)
    got = decode_push(enc, tensors, [LAYOUT.slices[k].length for k in keys])
    near(got, x[LAYOUT.server_slices(1)[0].start :], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(("push", "active"), [({}, False), ({"codec": "none", "error_feedback": True}, True),
                                              ({"codec": "fp16"}, True), ({"codec": "powersgd", "min_numel": 10**6}, False)])
def test_the_compressor_is_inactive_only_when_every_key_is_plain_float32(push, active):
    assert PushCompressor(CompressionConfig(push=push), LAYOUT).active is active


@pytest.mark.parametrize("push", [{}, {"codec": "none", "error_feedback": True}, {"codec": "topk", "ratio": 1.0, "error_feedback": True}])
def test_each_server_decodes_a_lossless_push_of_its_keys_back_to_the_input(push):
    comp, x = PushCompressor(CompressionConfig(push=push), LAYOUT), vec(LAYOUT.numel)
    for server in range(LAYOUT.num_servers):
        slices = LAYOUT.server_slices(server)[::-1]  # request order need not be key order
        enc, tensors = comp.encode([s.key for s in slices], x)
        assert torch.equal(decode_push(enc, tensors, [s.length for s in slices]), torch.cat([x[s.start : s.stop] for s in slices]))


def test_make_codec_passes_the_config_fields_and_a_seed_per_key():
    x, cfg = vec(1000), PushCodecConfig(codec="randomk", ratio=0.05)
    assert sent_positions(make_codec(cfg, 0), x) == sent_positions(make_codec(cfg, 0), x)
    assert sent_positions(make_codec(cfg, 0), x) != sent_positions(make_codec(cfg, 1), x)
    assert make_codec(PushCodecConfig(codec="qsgd", bits=4, bucket=64)).encode(x).meta == {"b": 4, "B": 64}


def test_two_keys_of_one_compressor_draw_different_randomk_positions():
    comp = PushCompressor(CompressionConfig(push={"codec": "randomk", "ratio": 0.05}), LAYOUT)
    x = torch.cat([vec(1024)] * 2 + [vec(LAYOUT.numel - 2048)])  # keys 0 and 1 hold the same values
    (e0, e1), (t0, t1) = comp.encode([0, 1], x)
    assert not torch.equal(decode(*e0[:2], [t0], 1024), decode(*e1[:2], [t1], 1024))
