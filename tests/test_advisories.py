"""What in a valid job is probably a mistake: said before the start (downpour train prints a WARNING),
never refused: a codec that drops information without error feedback, a pattern that matches nothing."""

from __future__ import annotations

from downpour.api import advisories
from downpour.config import parse_job

MODEL = {"name": "mlp", "args": {"input_shape": [4], "hidden": [3], "num_classes": 2}}


def job(**sections):
    return parse_job({"model": MODEL, **sections})


def test_a_plain_job_and_lossy_codecs_with_error_feedback_or_dgc_get_no_advice():
    assert advisories(job()) == []
    assert advisories(job(compression={"push": {"codec": "topk", "error_feedback": True}})) == []
    assert advisories(job(compression={"push": {"codec": "topk", "dgc": {"momentum": 0.0}}})) == []
    assert advisories(job(compression={"push": {"codec": "qsgd"}})) == []  # unbiased: nothing to feed back


def test_a_codec_that_drops_information_without_error_feedback_is_named_where_it_is_set():
    [advice] = advisories(job(compression={"push": {"codec": "topk"}}))
    assert advice.startswith("compression.push: codec topk without error_feedback") and "error_feedback: true" in advice
    [advice] = advisories(job(compression={"groups": [{"params": ["1.*"], "push": {"codec": "onebit"}}]}))
    assert advice.startswith("compression.groups[0].push: codec onebit")


def test_a_pattern_that_matches_no_parameter_is_named_with_the_models_parameters():
    found = advisories(job(compression={"groups": [{"params": ["*.bias", "nomatch*"], "push": {"codec": "fp16"}}]},
                           training={"consistency": "async", "consistency_groups": [{"params": ["4.wieght"], "consistency": "sync"}]}))
    assert found == ["compression.groups[0].params: 'nomatch*' matches no parameter of the model (1.weight, 1.bias, 4.weight, 4.bias)",
                     "training.consistency_groups[0].params: '4.wieght' matches no parameter of the model "
                     "(1.weight, 1.bias, 4.weight, 4.bias)"]


def test_a_staleness_bound_set_for_a_job_that_is_not_ssp_is_said_to_be_unused():
    assert advisories(job(training={"consistency": "async", "staleness_bound": 1})) == [
        "training.staleness_bound 1 applies to consistency ssp only; this job is async, so it is not used "
        "(set consistency: ssp to bound staleness)"]
    assert advisories(job(training={"consistency": "ssp", "staleness_bound": 1})) == []
    assert advisories(job(training={"consistency": "sync"})) == []  # (the default bound: not set)

