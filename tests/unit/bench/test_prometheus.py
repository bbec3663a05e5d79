"""prometheus.py: parsing an exposition text and diffing two scrapes."""

from __future__ import annotations

from kvtier.bench.prometheus import diff_samples, parse_metrics_text, sample_key

BEFORE = """\
# HELP kvtier:tier_hit_tokens Tokens served from a tier.
# TYPE kvtier:tier_hit_tokens counter
kvtier:tier_hit_tokens_total{tier="cpu"} 100.0
kvtier:tier_hit_tokens_total{tier="disk"} 5.0
# TYPE kvtier:load_seconds histogram
kvtier:load_seconds_bucket{le="0.01"} 3.0
kvtier:load_seconds_bucket{le="+Inf"} 4.0
kvtier:load_seconds_sum 0.07
kvtier:load_seconds_count 4.0
# TYPE kvtier:running gauge
kvtier:running 2.0
"""
AFTER = BEFORE.replace('"cpu"} 100.0', '"cpu"} 160.0').replace("_count 4.0", "_count 9.0") \
    .replace("running 2.0", "running 0.0") + 'kvtier:tier_hit_tokens_total{tier="redis"} 7.0\n'


def test_parse_flattens_samples_with_sorted_labels():
    samples = parse_metrics_text(BEFORE)
    assert samples['kvtier:tier_hit_tokens_total{tier="cpu"}'] == 100.0
    assert samples['kvtier:load_seconds_bucket{le="+Inf"}'] == 4.0
    assert samples["kvtier:running"] == 2.0
    assert sample_key("m", {"b": "2", "a": "1"}) == 'm{a="1",b="2"}'


def test_diff_of_two_scrapes():
    delta = diff_samples(parse_metrics_text(BEFORE), parse_metrics_text(AFTER))
    assert delta['kvtier:tier_hit_tokens_total{tier="cpu"}'] == 60.0
    assert delta['kvtier:tier_hit_tokens_total{tier="disk"}'] == 0.0
    assert delta['kvtier:tier_hit_tokens_total{tier="redis"}'] == 7.0  # new series: from 0
    assert delta["kvtier:load_seconds_count"] == 5.0
    assert delta["kvtier:running"] == -2.0
