"""The lip-reading benchmark's protocol pieces: which losses each variant trains with, and the label subsets."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_lipread")


def names(losses):
    return [(s["name"], s["weight"]) for s in losses]


def test_variant_losses_add_only_their_own_distillation_terms():
    sup = [("ctc", 0.3), ("attention_ce", 0.7)]
    kw = dict(levels=(1.0, 0.0, 1.0), aligner="time", distance="cosine", full_kl_weight=0.5,
              context_aligner="identity")
    assert names(bench.variant_losses("sup", 0.3, 1.0, **kw)) == sup
    assert names(bench.variant_losses("sup20", 0.3, 1.0, **kw)) == sup
    libs = bench.variant_losses("libs", 0.3, 1.0, **kw)
    assert names(libs) == sup + [("libs", 0.3)]
    params = libs[-1]["params"]
    assert (params["aligner"], params["distance"], params["context_aligner"]) == ("time", "cosine", "identity")
    assert (params["frame_weight"], params["sequence_weight"], params["context_weight"]) == (1.0, 0.0, 1.0)
    libs_kl = bench.variant_losses("libs_kl", 0.3, 1.0, **kw)
    assert names(libs_kl) == sup + [("libs", 0.3), ("ctc_kd", 0.5)]
    assert libs_kl[-1]["params"]["ctc_weight"] == 0.0  # all transcripts are there: KL only
    d = bench.variant_losses("distill20", 0.3, 1.0, **kw)
    assert names(d) == sup + [("libs", 0.3), ("ctc_kd", 1.0)] and d[-1]["params"]["ctc_weight"] == 1.0
    # every spec builds through the loss registry
    from xmodal.losses import build_losses

    build_losses(libs_kl), build_losses(d)


def test_label_subsets_keep_a_fraction_of_every_speaker(tmp_path):
    rows = [{"id": f"{s}{i}", "video": f"{s}{i}.mp4", "audio": f"{s}{i}.wav", "transcript": f"t {i}",
             "speaker": s} for s in "ab" for i in range(10)]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lab, part, n_lab, n = bench.label_subsets(manifest, 0.2, 3, tmp_path)
    labelled = [json.loads(x) for x in lab.read_text().splitlines()]
    partial = [json.loads(x) for x in part.read_text().splitlines()]
    assert (n_lab, n) == (4, 20) and {r["speaker"] for r in labelled} == {"a", "b"}
    assert sum(r["transcript"] is not None for r in partial) == 4 and len(partial) == 20
    assert {r["id"] for r in partial if r["transcript"]} == {r["id"] for r in labelled}
    assert all(Path(r["video"]).is_absolute() for r in partial)
    again = bench.label_subsets(manifest, 0.2, 3, tmp_path / ".." / tmp_path.name)
    assert again[0].read_text() == lab.read_text()  # the same subset for the same seed
    other = bench.label_subsets(manifest, 0.2, 4, tmp_path)[0].read_text()
    assert other != lab.read_text()


def test_student_sizes_are_valid_lip_reader_configs():
    from xmodal.config import from_dict
    from xmodal.students.lipreader import LipReaderConfig

    for width, dim in ((0.125, 64), (0.25, 128)):
        cfg = from_dict(LipReaderConfig, {**bench.student_model(width, dim), "vocab_size": 30})
        assert (cfg.width_mult, cfg.dim, cfg.ffn_dim, cfg.decoder_ffn_dim) == (width, dim, 2 * dim, 2 * dim)
