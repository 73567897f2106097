"""The lipread_distill job end to end on a tiny hand-made corpus, and `xmodal eval lipread` on its outputs."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.cli import main
from xmodal.config import LossSpec, from_dict
from xmodal.data.vocab import CharVocab
from xmodal.errors import CheckpointError, ConfigError, DataError
from xmodal.plugins import load_plugins


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three utterances: random 32x32 gray video at 25 fps and noise audio at 16 kHz, with transcripts."""
    from xmodal.data.grid import encode_video, encode_wav

    root = tmp_path_factory.mktemp("avcorpus")
    rng = np.random.default_rng(0)
    lines = []
    for i, (text, frames) in enumerate([("ab", 10), ("ba", 8), ("a b", 12)]):
        video = rng.integers(0, 255, (frames, 32, 32), dtype=np.uint8)
        audio = rng.normal(0, 0.1, frames * 640).astype(np.float32)  # 16000 / 25 samples per frame
        (root / f"u{i}.mp4").write_bytes(encode_video(video, 25.0)[0])
        (root / f"u{i}.wav").write_bytes(encode_wav(audio, 16000))
        lines.append(json.dumps({"id": f"u{i}", "video": f"u{i}.mp4", "audio": f"u{i}.wav", "transcript": text}))
    for split in ("train", "val", "test"):
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def job_config(corpus, run_dir, **over):
    tiny = dict(dim=16, num_layers=1, num_heads=2, ffn_dim=32, decoder_ffn_dim=32, conv_kernel=3, dropout=0.0)
    train = dict(steps=2, batch_size=3, lr=1e-3, warmup_steps=0, log_every=1, eval_every=0, ckpt_every=0)
    cfg = {
        "run_dir": str(run_dir),
        "data": {"root": str(corpus), "video": {"crop_size": 24, "hflip_prob": 0.0, "time_masks": 0},
                 "audio": {"n_mels": 20}},
        "teacher": {"model": {"n_mels": 20, "encoder": "conformer", **tiny}, "train": train},
        "student": {"width_mult": 0.0625, "blocks": [1, 1, 1, 1], "encoder": "transformer", **tiny},
        "losses": [{"name": "ctc", "weight": 0.3}, {"name": "attention_ce", "weight": 0.7},
                   {"name": "libs", "weight": 0.1, "params": {"filter": "hard", "max_cer": 2.0}},
                   {"name": "ctc_kd", "weight": 0.1}],
        "train": train,
        "eval": {"decoder": "greedy", "batch_size": 3},
    }
    cfg.update(over)
    return cfg


def test_job_trains_teacher_and_student_then_cli_scores_them(corpus, tmp_path, capsys):
    load_plugins()
    from xmodal.config import JOBS
    from xmodal.tasks.lipread.config import LipreadDistillConfig

    job = JOBS.get("lipread_distill")
    cfg = from_dict(LipreadDistillConfig, job_config(corpus, tmp_path / "run"))
    results = job.run(cfg)
    run = tmp_path / "run"
    assert {"student", "teacher"} <= set(results) and results["student"]["num_utterances"] == 3
    assert json.loads((run / "results.json").read_text())["student"]["cer"] == results["student"]["cer"]
    teacher_file = Path(results["teacher_path"])
    assert teacher_file.is_file() and teacher_file.parent.parent == run / "teacher"
    stamp = teacher_file.stat().st_mtime_ns
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_record = [r for r in records if "loss" in r][-1]
    assert {"loss/libs/accept_rate", "loss/ctc_kd/kl", "loss/attention_ce"} <= set(train_record)

    # eval lipread on the model file, on the engine checkpoint and on the run folder: same greedy scores
    scores = []
    for ckpt in (run / "lipreader.pt", sorted((run / "checkpoints").glob("step_*.pt"))[-1], run):
        assert main(["eval", "lipread", "--checkpoint", str(ckpt), "--manifest", str(corpus / "test.jsonl"),
                     "--examples", "0"]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert scores[0]["cer"] == pytest.approx(scores[1]["cer"]) == pytest.approx(scores[2]["cer"])
    assert main(["eval", "lipread", "--checkpoint", str(teacher_file), "--modality", "audio",
                 "--manifest", str(corpus / "test.jsonl"), "--decoder", "joint", "--beam-size", "2"]) == 0
    assert main(["eval", "lipread", "--checkpoint", str(teacher_file.parent), "--manifest",
                 str(corpus / "test.jsonl")]) == 2
    assert "training checkpoint of another job" in capsys.readouterr().err

    # a later run in the same folder reuses the trained teacher
    from xmodal.data.vocab import CharVocab
    from xmodal.tasks.lipread.job import obtain_teacher, resolve_manifests

    again = obtain_teacher(cfg.teacher, cfg.data, resolve_manifests(cfg.data), CharVocab(), run, cfg.eval,
                           torch.device("cpu"))
    assert teacher_file.stat().st_mtime_ns == stamp and not again.training

    # a changed teacher recipe trains into its own folder instead of meeting the old checkpoints; training is
    # seeded by the recipe, so the RNG state left by earlier work does not change the teacher
    from dataclasses import replace

    from xmodal.fingerprint import model_fingerprint

    changed = replace(cfg.teacher, train=replace(cfg.teacher.train, steps=1))
    made = []
    for i in range(2):
        torch.manual_seed(100 + i)
        made.append(obtain_teacher(changed, cfg.data, resolve_manifests(cfg.data), CharVocab(), tmp_path / f"t{i}",
                                   cfg.eval, torch.device("cpu")))
    assert model_fingerprint(made[0]) == model_fingerprint(made[1])
    assert model_fingerprint(made[0]) != model_fingerprint(again)
    assert len(list((tmp_path / "t0" / "teacher").glob("*/speech_recognizer.pt"))) == 1
    obtain_teacher(changed, cfg.data, resolve_manifests(cfg.data), CharVocab(), run, cfg.eval, torch.device("cpu"))
    assert len(list((run / "teacher").glob("*/speech_recognizer.pt"))) == 2
    assert teacher_file.stat().st_mtime_ns == stamp


def test_job_config_errors(corpus, tmp_path):
    load_plugins()
    from xmodal.config import JOBS
    from xmodal.tasks.lipread.config import LipreadDistillConfig
    from xmodal.tasks.lipread.job import uses_context

    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        from_dict(LipreadDistillConfig, job_config(corpus, tmp_path, teacher={}))
    no_teacher = from_dict(LipreadDistillConfig, job_config(corpus, tmp_path, teacher=None))
    with pytest.raises(ConfigError, match="need a teacher"):
        JOBS.get("lipread_distill").run(no_teacher)
    assert uses_context([LossSpec("ctc"), LossSpec("attention_ce")]) == (True, False)
    assert uses_context([LossSpec("libs", params={"context_weight": 0})]) == (False, False)
    assert uses_context([LossSpec("libs"), LossSpec("attention_ce", 0.0)]) == (True, True)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        from xmodal.tasks.lipread.cli import load_for_eval

        load_for_eval(tmp_path / "none.pt")
    torch.save({"weights": 1}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="neither a recogniser model file"):
        load_for_eval(tmp_path / "odd.pt")


def test_cached_teacher_matches_online_teacher(corpus, tmp_path, monkeypatch):
    """`xmodal cache` on a lipread config stores the teacher's outputs; training then reads them (no audio) and
    takes the same first step as with the teacher online; a cache of another teacher setup is refused."""
    import yaml

    def first_loss(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in records if "loss" in r)

    one_step = dict(steps=1, batch_size=3, lr=1e-3, warmup_steps=0, log_every=1, eval_every=0, ckpt_every=0)
    base = job_config(corpus, tmp_path / "online", train=one_step)
    base["losses"][2]["params"]["max_cer"] = 0.5  # the filter drops some samples: the cached logits must agree
    cfg_path = tmp_path / "lip.yaml"
    cfg_path.write_text(yaml.safe_dump({"job": "lipread_distill", **base}))
    assert main(["distill", str(cfg_path)]) == 0
    cache = tmp_path / "teacher_cache"
    assert main(["cache", str(cfg_path), "--out", str(cache), "--dtype", "float32", "--no-progress"]) == 0
    assert json.loads((cache / "manifest.json").read_text())["complete"]

    cached = {**base, "run_dir": str(tmp_path / "cached"), "teacher": {**base["teacher"], "cache": str(cache)}}
    cached["teacher"]["model"] = base["teacher"]["model"]
    # the teacher folder holds the trained teacher; the cached run reuses it from its own run folder
    import shutil

    shutil.copytree(tmp_path / "online" / "teacher", tmp_path / "cached" / "teacher")
    cached["data"] = {**base["data"], "val": None, "test": None}  # scoring would read audio; training must not
    cfg_path.write_text(yaml.safe_dump({"job": "lipread_distill", **cached}))
    import xmodal.data.av

    def no_audio(path, *args, **kwargs):
        raise AssertionError(f"audio {path} was read although the teacher's outputs are cached")

    with monkeypatch.context() as m:
        m.setattr(xmodal.data.av, "load_audio", no_audio)
        assert main(["distill", str(cfg_path)]) == 0
    online, offline = first_loss(tmp_path / "online"), first_loss(tmp_path / "cached")
    for key in ("loss", "loss/libs", "loss/libs/accept_rate", "loss/ctc_kd/kl", "loss/ctc_kd/ctc"):
        assert offline[key] == pytest.approx(online[key], rel=1e-4, abs=1e-6), key

    # without the context level the teacher setup differs: the cache (built with context) is refused
    no_ctx = {**cached, "run_dir": str(tmp_path / "no_ctx")}
    no_ctx["losses"] = [dict(s) for s in cached["losses"]]
    no_ctx["losses"][2] = {**no_ctx["losses"][2], "params": {**no_ctx["losses"][2]["params"], "context_weight": 0.0}}
    shutil.copytree(tmp_path / "online" / "teacher", tmp_path / "no_ctx" / "teacher")
    cfg_path.write_text(yaml.safe_dump({"job": "lipread_distill", **no_ctx}))
    assert main(["distill", str(cfg_path)]) == 2
    assert not Path(tmp_path / "no_ctx" / "lipreader.pt").exists()


# ---------------------------------------------------------------- wav2vec2 teacher (locally created weights)


def wav2vec2_job_config(corpus, run_dir, teacher_file, **over):
    cfg = job_config(corpus, run_dir, **over)
    cfg["teacher"] = {"kind": "wav2vec2", "path": str(teacher_file)}
    cfg["data"] = {**cfg["data"], "audio": {"features": "waveform"}}
    cfg["losses"] = [dict(s) for s in cfg["losses"]]
    cfg["losses"][2] = {**cfg["losses"][2], "params": {**cfg["losses"][2]["params"], "context_weight": 0.0}}
    return cfg


@pytest.fixture()
def wav2vec2_file(tmp_path):
    from test_speech_models import W2V_CFG
    from torchaudio.models import wav2vec2_model

    from xmodal.teachers.speech import save_wav2vec2

    labels = ["<pad>", "|", "A", "B", "'"]
    torch.manual_seed(0)
    model = wav2vec2_model(**{**W2V_CFG, "aux_num_out": len(labels)}).eval()
    path = tmp_path / "w2v_teacher.pt"
    save_wav2vec2(model, path, {**W2V_CFG, "aux_num_out": len(labels)}, labels=labels)
    return path


def test_job_distills_from_a_wav2vec2_teacher_on_waveforms(corpus, wav2vec2_file, tmp_path):
    """kind: wav2vec2 loads a local file, reads waveforms (50 Hz states, time-aligned to 25 fps video), maps its
    labels into the student's vocabulary for filtering and ctc_kd, and scores the teacher on test audio."""
    load_plugins()
    from xmodal.config import JOBS
    from xmodal.tasks.lipread.config import LipreadDistillConfig

    cfg = from_dict(LipreadDistillConfig, wav2vec2_job_config(corpus, tmp_path / "run", wav2vec2_file))
    results = JOBS.get("lipread_distill").run(cfg)
    assert results["teacher_path"] == str(wav2vec2_file)
    assert results["teacher"]["num_utterances"] == 3 and results["student"]["num_utterances"] == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    assert {"loss/libs/frame", "loss/libs/accept_rate", "loss/ctc_kd/kl"} <= set(last)
    assert "loss/libs/context" not in last
    assert all(np.isfinite(last[k]) for k in ("loss", "loss/libs", "loss/ctc_kd/kl"))


def test_wav2vec2_teacher_config_errors_say_what_to_set(corpus, wav2vec2_file, tmp_path):
    load_plugins()
    from xmodal.config import JOBS
    from xmodal.tasks.lipread.config import LipreadDistillConfig

    job = JOBS.get("lipread_distill")

    def run(**change):
        cfg = wav2vec2_job_config(corpus, tmp_path / "run", wav2vec2_file)
        for key, value in change.items():
            cfg[key] = value(cfg[key])
        job.run(from_dict(LipreadDistillConfig, cfg))

    with pytest.raises(ConfigError, match="set data.audio.features: waveform"):
        run(data=lambda d: {**d, "audio": {"features": "fbank", "n_mels": 20}})
    with pytest.raises(ConfigError, match="context_weight: 0"):
        run(losses=lambda ls: [ls[0], {"name": "libs", "weight": 0.1}])
    with pytest.raises(ConfigError, match="set by the job"):
        run(teacher=lambda t: {**t, "params": {"vocab_tokens": ["a"]}})
    with pytest.raises(ConfigError, match="unknown parameter 'normalise_waveform'.*normalize_waveform"):
        run(teacher=lambda t: {**t, "params": {"normalise_waveform": True}})
    with pytest.raises(ConfigError, match="loaded from 'path', not trained here"):
        from_dict(LipreadDistillConfig, {**job_config(corpus, tmp_path), "teacher": {
            "kind": "wav2vec2", "model": {"n_mels": 20}, "train": {"steps": 1}}})
    with pytest.raises(ConfigError, match="unknown speech teacher kind 'wav2vec'.*wav2vec2"):
        run(teacher=lambda t: {**t, "kind": "wav2vec"})
    trained_here = {**job_config(corpus, tmp_path / "t"), "data": {**job_config(corpus, tmp_path)["data"],
                                                                    "audio": {"features": "waveform"}}}
    with pytest.raises(ConfigError, match="set data.audio.features: fbank"):
        job.run(from_dict(LipreadDistillConfig, trained_here))
    with pytest.raises(ConfigError, match="audio.features must be one of"):
        run(data=lambda d: {**d, "audio": {"features": "mfcc"}})


def relabelled_corpus(corpus, out, change, splits=("train",)):
    """A copy of the corpus manifests (absolute media paths) with `change(row, index)` applied to `splits`."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        rows = [json.loads(line) for line in (corpus / f"{split}.jsonl").read_text().splitlines()]
        rows = [{**r, "video": str(corpus / r["video"]), "audio": str(corpus / r["audio"])} for r in rows]
        if split in splits:
            rows = [change(r, i) for i, r in enumerate(rows)]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def empty_transcripts(row, i):
    return {**row, "transcript": ""}


def text_key(row, i):
    return {k if k != "transcript" else "text": v for k, v in row.items()}


@pytest.mark.parametrize("change, why", [
    (empty_transcripts, r"the key 'transcript' is empty in all 3 records \(keys present: audio, id, transcript, "
                        r"video\)"),
    (text_key, r"none of its 3 records has the key 'transcript' \(keys present: audio, id, text, video\)"),
])
def test_training_without_any_transcript_is_refused_before_anything_trains(corpus, tmp_path, capsys, change, why):
    """Supervised losses on a manifest without usable transcripts used to train with loss 0.0 and exit 0."""
    import yaml

    data = relabelled_corpus(corpus, tmp_path / "data", change)
    cfg = job_config(data, tmp_path / "run")
    cfg_path = tmp_path / "lip.yaml"
    cfg_path.write_text(yaml.safe_dump({"job": "lipread_distill", **cfg}))
    assert main(["distill", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'train.jsonl'}: " in err and "student's supervised losses (ctc, attention_ce)" in err
    assert re.search(why, err)
    assert not (tmp_path / "run" / "lipreader.pt").exists() and not (tmp_path / "run" / "teacher").exists()
    assert not list((tmp_path / "run").glob("**/*.pt")) and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unlabelled_eval_manifests_and_teacher_data_are_refused(corpus, tmp_path):
    load_plugins()
    from xmodal.config import JOBS
    from xmodal.tasks.lipread.config import LipreadDistillConfig
    from xmodal.tasks.lipread.job import obtain_teacher, resolve_manifests

    data = relabelled_corpus(corpus, tmp_path / "data", empty_transcripts, splits=("test",))
    cfg = from_dict(LipreadDistillConfig, job_config(data, tmp_path / "run"))
    with pytest.raises(DataError, match=r"test\.jsonl: the key 'transcript' is empty.*CER/WER scoring on data\.test"):
        JOBS.get("lipread_distill").run(cfg)
    assert not (tmp_path / "run").exists()
    # a teacher trained here learns from transcripts too (e.g. through `xmodal cache`)
    data = relabelled_corpus(corpus, tmp_path / "data2", text_key)
    cfg = from_dict(LipreadDistillConfig, job_config(data, tmp_path / "run2"))
    with pytest.raises(DataError, match=r"has the key 'transcript'.*teacher's supervised losses \(ctc, attention_ce\)"):
        obtain_teacher(cfg.teacher, cfg.data, resolve_manifests(cfg.data), CharVocab(), tmp_path / "run2", cfg.eval,
                       torch.device("cpu"))


def test_semi_supervised_training_on_some_transcripts_still_runs(corpus, tmp_path):
    """One transcript in three is enough; the supervised losses log how many labelled samples each step saw."""
    load_plugins()
    from xmodal.config import JOBS
    from xmodal.tasks.lipread.config import LipreadDistillConfig

    data = relabelled_corpus(corpus, tmp_path / "data", lambda r, i: r if i == 0 else {**r, "transcript": None})
    one_step = dict(steps=1, batch_size=3, lr=1e-3, warmup_steps=0, log_every=1, eval_every=0, ckpt_every=0)
    cfg = job_config(data, tmp_path / "run", train=one_step)
    cfg["teacher"]["train"] = one_step
    results = JOBS.get("lipread_distill").run(from_dict(LipreadDistillConfig, cfg))
    assert results["student"]["num_utterances"] == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "loss" in r)
    assert step["loss/ctc/labelled"] == 1 and step["loss/attention_ce/labelled"] == 1


def test_eval_lipread_refuses_a_manifest_without_references(corpus, tmp_path, capsys):
    """`xmodal eval lipread` used to print "cer": NaN and exit 0."""
    from xmodal.nn.recognizer import save_recognizer
    from xmodal.students.lipreader import LipReader, LipReaderConfig

    tiny = dict(dim=16, num_layers=1, num_heads=2, ffn_dim=32, decoder_ffn_dim=32, conv_kernel=3, dropout=0.0)
    model = LipReader(LipReaderConfig(width_mult=0.0625, blocks=[1, 1, 1, 1], encoder="transformer", **tiny))
    save_recognizer(model, tmp_path / "lipreader.pt", meta={"vocab": CharVocab().to_dict(), "video": {"crop_size": 24}})
    for change in (empty_transcripts, text_key):
        data = relabelled_corpus(corpus, tmp_path / change.__name__, change, splits=("test",))
        out = tmp_path / f"{change.__name__}.json"
        code = main(["eval", "lipread", "--checkpoint", str(tmp_path / "lipreader.pt"), "--manifest",
                     str(data / "test.jsonl"), "--output", str(out)])
        captured = capsys.readouterr()
        assert code == 2 and "NaN" not in captured.out and not out.exists()
        assert f"{data / 'test.jsonl'}: " in captured.err and "'transcript'" in captured.err


# ---------------------------------------------------------------- sentencepiece vocabulary


def identity(row, i):
    return row


def test_job_with_a_sentencepiece_vocabulary(corpus, tmp_path, capsys):
    """data.vocab names a .model file (inside data.root): teacher and student learn its units, the lip reader
    file and engine checkpoints score with it, the teacher's identity follows the model's content (not its file
    name), and a damaged engine checkpoint is refused by `xmodal eval lipread`."""
    load_plugins()
    from test_checkpoint import flip_tensor_byte

    from xmodal.config import JOBS
    from xmodal.data.vocab import SentencePieceVocab, train_sentencepiece
    from xmodal.nn.recognizer import load_recognizer
    from xmodal.tasks.lipread.config import LipreadDistillConfig
    from xmodal.tasks.lipread.job import resolve_manifests, teacher_folder

    data = relabelled_corpus(corpus, tmp_path / "data", identity)
    units = train_sentencepiece(["ab", "ba", "a b"], 6, source="tiny")
    units.save(data / "units.model")
    cfg = job_config(data, tmp_path / "run", losses=[{"name": "ctc", "weight": 0.3},
                                                     {"name": "attention_ce", "weight": 0.7},
                                                     {"name": "ctc_kd", "weight": 0.1}])
    cfg["data"]["vocab"] = "units.model"
    cfg["student"]["vocab_size"] = cfg["teacher"]["model"]["vocab_size"] = len(units)  # 8: not the 30 characters
    cfg = from_dict(LipreadDistillConfig, cfg)
    results = JOBS.get("lipread_distill").run(cfg)
    assert results["student"]["num_utterances"] == results["teacher"]["num_utterances"] == 3
    run = tmp_path / "run"
    _, meta = load_recognizer(run / "lipreader.pt", return_meta=True)
    assert meta["vocab"]["kind"] == "sentencepiece" and SentencePieceVocab.from_dict(meta["vocab"]) == units

    scores = []
    for ckpt in (run / "lipreader.pt", sorted((run / "checkpoints").glob("step_*.pt"))[-1]):
        assert main(["eval", "lipread", "--checkpoint", str(ckpt), "--manifest", str(data / "test.jsonl"),
                     "--examples", "0"]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert scores[0]["cer"] == pytest.approx(scores[1]["cer"]) == pytest.approx(results["student"]["cer"])

    damaged = tmp_path / "step_damaged.pt"
    damaged.write_bytes(sorted((run / "checkpoints").glob("step_*.pt"))[-1].read_bytes())
    flip_tensor_byte(damaged)
    assert main(["eval", "lipread", "--checkpoint", str(damaged), "--manifest", str(data / "test.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{damaged} is damaged: its blake2b checksum does not match" in err

    # the teacher's folder (and fingerprint) follow the vocabulary's content: a retrained model under the same
    # name is another vocabulary
    paths = resolve_manifests(cfg.data)
    before = teacher_folder(cfg.teacher, cfg.data, paths, run)
    assert Path(results["teacher_path"]).parent == before
    train_sentencepiece(["ab", "ba", "a b"], 5, source="tiny").save(data / "units.model")
    assert teacher_folder(cfg.teacher, cfg.data, paths, run) != before


def test_a_missing_sentencepiece_model_is_named(corpus, tmp_path):
    load_plugins()
    from xmodal.config import JOBS
    from xmodal.tasks.lipread.config import LipreadDistillConfig

    cfg = job_config(corpus, tmp_path / "run")
    cfg["data"]["vocab"] = "units.model"
    with pytest.raises(ConfigError, match=rf"data.vocab: sentencepiece model {re.escape(str(corpus / 'units.model'))} "
                                          "does not exist"):
        JOBS.get("lipread_distill").run(from_dict(LipreadDistillConfig, cfg))
    assert not (tmp_path / "run").exists()


def test_teacher_sample_rate_must_match_the_audio_settings(corpus, tmp_path):
    """A Whisper teacher reads 16 kHz audio; data.audio.sample_rate: 8000 would feed it audio at half speed.
    Refused before anything trains, naming both settings."""
    load_plugins()
    from test_whisper_teacher import build_whisper

    from xmodal.config import JOBS
    from xmodal.tasks.lipread.config import LipreadDistillConfig

    folder = build_whisper(tmp_path / "whisper")
    cfg = job_config(corpus, tmp_path / "run", losses=[{"name": "ctc", "weight": 1.0},
                                                       {"name": "libs", "weight": 0.1,
                                                        "params": {"context_weight": 0.0}}])
    cfg["teacher"] = {"kind": "whisper", "path": str(folder)}
    cfg["data"] = {**cfg["data"], "audio": {"features": "waveform", "sample_rate": 8000}}
    with pytest.raises(ConfigError, match=r"teacher.path .*whisper reads audio sampled at 16000 Hz but "
                                          r"data.audio.sample_rate is 8000; set data.audio.sample_rate: 16000"):
        JOBS.get("lipread_distill").run(from_dict(LipreadDistillConfig, cfg))
    assert not list((tmp_path / "run").glob("**/*.pt"))
