"""The `lipread_distill` job: (train the speech teacher,) then train a lip reader from it and score CER/WER.

Run folder: `config.yaml`, `metrics.jsonl`, `checkpoints/` (engine), `lipreader.pt` (the student as a model
file for `xmodal eval lipread`), `results.json` (teacher and student test scores); a teacher trained here
lives in `teacher/` (its own run folder plus `speech_recognizer.pt`) and is reused while its config, audio
settings, training data and vocabulary (`data.vocab`: characters or a sentencepiece model) are unchanged.

The teacher's states and decoder contexts define the alignment space (its width); the student's are
projected into it (`projection`), which is LIBS's P(·). Losses come from the registry: typically `ctc` +
`attention_ce` (hybrid supervised) and `libs` / `ctc_kd` (distillation).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.adapters import ADAPTERS
from xmodal.alignment import AlignmentSpace
from xmodal.config import LossSpec, register_job, to_dict
from xmodal.data.vocab import Vocab, load_vocab
from xmodal.device import resolve_device, seed_everything
from xmodal.engine.cache import CacheSource, register_cache_source
from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.fingerprint import DataIdentity, data_identity, hash_json
from xmodal.io import atomic_write_json
from xmodal.models import create_student, create_teacher
from xmodal.nn.recognizer import SequenceRecognizer, load_recognizer, save_recognizer
from xmodal.tasks.lipread.config import LipreadDataConfig, LipreadDistillConfig, SpeechTeacherConfig
from xmodal.tasks.lipread.evaluate import evaluate_lipreading

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # state-dict prefix of the recogniser inside RecognizerModule checkpoints
CONTEXT_LOSSES = {"attention_ce": (True, False), "libs_context": (True, True)}


class RecognizerModule(nn.Module):
    """A recogniser with its adapters and projections: batch → {modality: Features, modality_context: Features}.

    The recogniser is `self.model` and the projections live in `self.space`; the adapters are views over
    them and not submodules, so the state dict holds each weight once (`model.*`, `space.projections.*`).
    """

    def __init__(self, model: SequenceRecognizer, modality: str, *, dim: int | None = None,
                 projection: str = "linear", context: bool = True, frozen: bool = False):
        super().__init__()
        self.model = model
        self.space = AlignmentSpace(dim or model.width)
        role = "teacher" if frozen else "student"
        kind = "identity" if frozen else projection  # a frozen teacher defines the space: its width, no projection
        main = self.space.attach(role, ADAPTERS.build(modality, encoder=model, frozen=frozen), kind=kind)
        adapters = [main]
        if context:
            adapters.append(self.space.attach(role, ADAPTERS.build(f"{modality}_context", source=main), kind=kind))
        self._adapters = tuple(adapters)

    def forward(self, batch: dict[str, Any]) -> dict[str, Features]:
        return {a.modality: a(batch) for a in self._adapters}


def uses_context(losses: Sequence[LossSpec]) -> tuple[bool, bool]:
    """(student, teacher) need decoder-context Features for these losses."""
    student = teacher = False
    for spec in losses:
        if spec.weight == 0:
            continue
        s, t = CONTEXT_LOSSES.get(spec.name, (False, False))
        if spec.name == "libs" and spec.params.get("context_weight", 1.0) != 0:
            s = t = True
        student, teacher = student or s, teacher or t
    return student, teacher


# ---------------------------------------------------------------- data


@dataclass
class Manifests:
    train: Path
    val: Path | None
    test: Path | None


def resolve_manifests(cfg: LipreadDataConfig) -> Manifests:
    """Absolute manifest paths; writes the synthetic GRID corpus into `root` first when configured."""
    root = Path(cfg.root) if cfg.root else None
    if cfg.synthetic is not None:
        if root is None:
            raise ConfigError("data.synthetic needs data.root: the folder to write the synthetic corpus into")
        from xmodal.data.grid import synthesize_grid

        s = cfg.synthetic
        synthesize_grid(root, speakers=s.speakers, utterances=s.utterances, seed=s.seed, roi_size=s.roi_size,
                        fps=s.fps, sample_rate=s.sample_rate)

    def path(name: str | None) -> Path | None:
        if name is None:
            return None
        p = Path(name)
        return p if p.is_absolute() or root is None else root / p

    out = Manifests(path(cfg.train), path(cfg.val), path(cfg.test))
    if not out.train.is_file():
        raise ConfigError(f"data.train: manifest {out.train} does not exist (set data.root, data.synthetic or a path)")
    for name in ("val", "test"):
        p = getattr(out, name)
        if p is not None and not p.is_file():
            log.warning("data.%s: %s does not exist; skipping that split", name, p)
            setattr(out, name, None)
    return out


def resolve_vocab(spec: str, root: str | None = None) -> Vocab:
    """The job's vocabulary from `data.vocab`: the characters themselves, or a sentencepiece `.model` file (a
    relative path is taken inside `data.root` when it is set, like the manifests)."""
    if spec.endswith(".model"):
        path = Path(spec)
        if not path.is_absolute() and root:
            path = Path(root) / path
        if not path.is_file():
            raise ConfigError(f"data.vocab: sentencepiece model {path} does not exist (write one with `xmodal data "
                              "vocab`, or give the vocabulary's characters)")
        return load_vocab(path)
    return load_vocab(spec)


def job_vocab(cfg: LipreadDataConfig) -> Vocab:
    return resolve_vocab(cfg.vocab, cfg.root)


def av_dataset(manifest: Path, cfg: LipreadDataConfig, vocab: Vocab, *, video: bool, audio: bool,
               train: bool, seed: int = 0):
    from xmodal.data.av import AVSpeechDataset

    return AVSpeechDataset(manifest, vocab, video=cfg.video if video else None, audio=cfg.audio if audio else None,
                           train=train, require_transcript=False, seed=seed)


def eval_loader(manifest: Path | None, cfg: LipreadDataConfig, vocab: Vocab, batch_size: int, *,
                video: bool, audio: bool):
    if manifest is None:
        return None
    from torch.utils.data import DataLoader

    from xmodal.data.av import collate_av

    ds = av_dataset(manifest, cfg, vocab, video=video, audio=audio, train=False)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_av)


def supervised_losses(losses: Sequence[LossSpec]) -> list[str]:
    """Labels of the configured losses (weight ≠ 0) that learn from reference transcripts (`supervised`)."""
    from xmodal.losses import LOSSES

    return [s.label or s.name for s in losses if s.weight and getattr(LOSSES.get(s.name), "supervised", False)]


def check_labels(paths: Manifests, losses: Sequence[LossSpec], who: str = "student") -> None:
    """Before anything trains: with supervised losses the training manifest must hold some transcript (any
    fraction: semi-supervised training is fine), and val/test manifests must hold references to score."""
    from xmodal.data.av import read_av_manifest, require_transcripts

    names = supervised_losses(losses)
    if names:
        require_transcripts(read_av_manifest(paths.train), f"the {who}'s supervised losses ({', '.join(names)})")
    for split in ("val", "test"):
        manifest = getattr(paths, split)
        if manifest is not None:
            require_transcripts(read_av_manifest(manifest), f"CER/WER scoring on data.{split}")


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in ("cer", "wer")}


# ---------------------------------------------------------------- teacher


def teacher_recipe(cfg: SpeechTeacherConfig) -> dict:
    """The settings that make the teacher what it is (where its outputs are cached is not one of them)."""
    return {k: v for k, v in to_dict(cfg).items() if k != "cache"}


def teacher_data_identity(data: LipreadDataConfig, paths: Manifests, vocab: Vocab | None = None) -> DataIdentity:
    """What the teacher sees of the data: the training manifest's content, its audio files (path, size, time),
    its transcripts and the vocabulary's content (`vocab.to_dict()`, so a retrained sentencepiece model under the
    same file name counts as another vocabulary): any change trains or caches the teacher anew."""
    from xmodal.data.av import read_av_manifest

    records = read_av_manifest(paths.train)
    vocab = job_vocab(data) if vocab is None else vocab
    return data_identity({"train": paths.train}, media=[str(r.audio) for r in records if r.audio is not None],
                         transcripts=[[r.id, r.transcript] for r in records], vocab=vocab.to_dict())


def teacher_folder(cfg: SpeechTeacherConfig, data: LipreadDataConfig, paths: Manifests, run_dir: Path,
                   vocab: Vocab | None = None) -> Path:
    """`run_dir/teacher/<settings hash>`: one folder per recipe and data (by content, not by name or size), so a
    changed teacher, training set or vocabulary never meets old checkpoints."""
    key = hash_json({"teacher": teacher_recipe(cfg), "audio": to_dict(data.audio),
                     "data": teacher_data_identity(data, paths, vocab).digest})
    return run_dir / "teacher" / key


def check_teacher_fits(model: nn.Module, cfg: LipreadDistillConfig, vocab: Vocab, teacher_context: bool) -> None:
    """The teacher reads the configured audio features, shares the vocabulary and has a decoder when needed."""
    kind = cfg.teacher.kind
    wants = getattr(model, "input_features", "fbank")
    if cfg.data.audio.features != wants:
        raise ConfigError(f"a '{kind}' teacher reads {wants} audio but data.audio.features is "
                          f"'{cfg.data.audio.features}'; set data.audio.features: {wants}")
    rate = getattr(model, "sample_rate", None)  # teachers that know their input rate (e.g. Whisper) declare it
    if rate is not None and int(rate) != cfg.data.audio.sample_rate:
        raise ConfigError(f"the '{kind}' teacher at teacher.path {cfg.teacher.path} reads audio sampled at {rate} Hz "
                          f"but data.audio.sample_rate is {cfg.data.audio.sample_rate}; set data.audio.sample_rate: "
                          f"{rate} (files at other rates are resampled on loading)")
    size = getattr(model, "vocab_size", None)
    if size is not None and size != len(vocab):
        raise ConfigError(f"the teacher predicts {size} tokens, the vocabulary has {len(vocab)}; teacher and "
                          "student must share the vocabulary (for wav2vec2, give teacher.params.labels)")
    if teacher_context and not hasattr(model, "decode_teacher_forced"):
        raise ConfigError(f"the losses use the teacher's decoder context (libs context level) but a '{kind}' "
                          "teacher has no attention decoder; set the libs loss's context_weight: 0")


def obtain_teacher(cfg: SpeechTeacherConfig, data: LipreadDataConfig, paths: Manifests, vocab: Vocab,
                   run_dir: Path, eval_cfg, device: torch.device) -> nn.Module:
    """The teacher recogniser: loaded from `path` by `kind`, or trained on the training audio (and reused later)."""
    if cfg.path is not None:
        return create_teacher(cfg, family="speech", vocab=vocab)  # teacher.kind: speech, wav2vec2, ...
    from xmodal.data.av import collate_av
    from xmodal.engine import Distiller
    from xmodal.losses import build_losses
    from xmodal.teachers.speech import SpeechRecognizer

    folder = teacher_folder(cfg, data, paths, run_dir, vocab)
    recipe = teacher_recipe(cfg)
    model_file = folder / "speech_recognizer.pt"
    key = folder.name
    marker = folder / "trained.json"
    if model_file.is_file() and marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        log.info("teacher: reusing the recogniser trained earlier in %s", model_file)
        return load_recognizer(model_file, kind="speech_recognizer")
    if cfg.model.vocab_size != len(vocab):
        raise ConfigError(f"teacher.model.vocab_size is {cfg.model.vocab_size} but the vocabulary has {len(vocab)} "
                          "tokens (<blank>, <sos/eos> and data.vocab)")
    if data.audio.features != "fbank":
        raise ConfigError(f"teacher.model is a log-mel speech recogniser but data.audio.features is "
                          f"'{data.audio.features}'; set data.audio.features: fbank")
    if cfg.model.n_mels != data.audio.n_mels:
        raise ConfigError(f"teacher.model.n_mels ({cfg.model.n_mels}) must equal data.audio.n_mels "
                          f"({data.audio.n_mels})")
    seed_everything(cfg.train.seed)  # the same teacher whatever ran before in this process
    model = SpeechRecognizer(cfg.model)
    student = RecognizerModule(model, "audio", context=any(uses_context(cfg.losses)))
    train_ds = av_dataset(paths.train, data, vocab, video=False, audio=True, train=True, seed=cfg.train.seed)
    check_labels(Manifests(paths.train, paths.val, None), cfg.losses, "teacher")
    val = eval_loader(paths.val, data, vocab, eval_cfg.batch_size, video=False, audio=True)
    evaluator = None
    if val is not None:
        def evaluator(module: RecognizerModule) -> dict[str, float]:
            return _scores(evaluate_lipreading(module.model, val, vocab, "greedy", input_key="audio",
                                                max_batches=eval_cfg.max_batches))
    log.info("teacher: training a %s-parameter speech recogniser for %d steps",
             f"{sum(p.numel() for p in model.parameters()):,}", cfg.train.steps)
    Distiller(student, build_losses(cfg.losses), train_ds, cfg.train, folder, evaluator=evaluator,
              config={"teacher": recipe, "audio": to_dict(data.audio)}, collate_fn=collate_av, resume="auto").fit()
    save_recognizer(model, model_file, meta={"vocab": vocab.to_dict(), "audio": to_dict(data.audio)})
    atomic_write_json(marker, {"key": key, "model": str(model_file)})
    return model.eval()


def teacher_fingerprint(model: nn.Module, cfg: LipreadDistillConfig, paths: Manifests,
                        vocab: Vocab | None = None) -> str:
    """The teacher's identity for checkpoints and caches (`xmodal.fingerprint.fingerprint`): weights, audio
    features, whether context is used (plus the loader's own identity when it has one, e.g. a wav2vec2 label
    map), and the data it runs on (`teacher_data_identity`)."""
    from xmodal.fingerprint import fingerprint

    extra = {"audio": to_dict(cfg.data.audio), "context": uses_context(cfg.losses)[1]}
    if getattr(model, "fingerprint", None) is not None:
        extra["loader"] = model.fingerprint
    return fingerprint(model, extra, data=teacher_data_identity(cfg.data, paths, vocab))


@register_cache_source("lipread_distill")
def cache_source(cfg: LipreadDistillConfig) -> CacheSource:
    """`xmodal cache CONFIG`: the teacher's states, CTC logits and decoder context per training utterance.

    Audio is never augmented, so one pass holds every epoch's teacher outputs; set `teacher.cache` to use them.
    """
    if cfg.teacher is None:
        raise ConfigError("xmodal cache: this config has no 'teacher' block, so there is no teacher to cache")
    device = resolve_device(cfg.train.device)
    vocab = job_vocab(cfg.data)
    paths = resolve_manifests(cfg.data)
    context = uses_context(cfg.losses)[1]
    model = obtain_teacher(cfg.teacher, cfg.data, paths, vocab, Path(cfg.run_dir), cfg.eval, device)
    check_teacher_fits(model, cfg, vocab, context)
    model.eval().requires_grad_(False)
    teacher = RecognizerModule(model, "audio", context=context, frozen=True)
    dataset = av_dataset(paths.train, cfg.data, vocab, video=False, audio=True, train=False)
    from xmodal.data.av import collate_av

    return CacheSource(teacher, dataset, teacher_fingerprint(model, cfg, paths, vocab), collate_fn=collate_av,
                       batch_size=cfg.train.batch_size, out_dir=cfg.teacher.cache, meta={"data": str(paths.train)},
                       data=teacher_data_identity(cfg.data, paths, vocab))


# ---------------------------------------------------------------- the job


@register_job("lipread_distill", LipreadDistillConfig,
              help="train a lip reader from a speech teacher (LIBS / CTC distillation) and score CER/WER")
def run(cfg: LipreadDistillConfig) -> dict[str, Any]:
    from xmodal.data.av import collate_av
    from xmodal.engine import Distiller
    from xmodal.losses import build_losses
    from xmodal.tasks.lipread.decode import DECODERS

    DECODERS.get(cfg.eval.decoder)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    run_dir = Path(cfg.run_dir)
    vocab = job_vocab(cfg.data)
    if cfg.student.vocab_size != len(vocab):
        raise ConfigError(f"student.vocab_size is {cfg.student.vocab_size} but the vocabulary has {len(vocab)} "
                          "tokens (<blank>, <sos/eos> and data.vocab)")
    paths = resolve_manifests(cfg.data)
    check_labels(paths, cfg.losses)
    s_ctx, t_ctx = uses_context(cfg.losses)

    teacher_model = teacher = teacher_file = None
    fingerprint = None
    if cfg.teacher is not None:
        teacher_model = obtain_teacher(cfg.teacher, cfg.data, paths, vocab, run_dir, cfg.eval, device)
        check_teacher_fits(teacher_model, cfg, vocab, t_ctx)
        teacher_model.eval().requires_grad_(False)
        teacher = RecognizerModule(teacher_model, "audio", context=t_ctx, frozen=True)
        fingerprint = teacher_fingerprint(teacher_model, cfg, paths, vocab)
        teacher_file = Path(cfg.teacher.path) if cfg.teacher.path is not None else (
            teacher_folder(cfg.teacher, cfg.data, paths, run_dir, vocab) / "speech_recognizer.pt")
    elif any(s.name.startswith(("libs", "ctc_kd")) for s in cfg.losses if s.weight):
        raise ConfigError("losses: libs / ctc_kd need a teacher; add a 'teacher' block or drop those losses")

    seed_everything(cfg.train.seed)  # the student's initialisation must not depend on how the teacher was obtained
    student_model = create_student(cfg.student, family="speech")  # student kind lipreader
    dim = teacher_model.width if teacher_model is not None else None
    student = RecognizerModule(student_model, "video", dim=dim, projection=cfg.projection, context=s_ctx)
    cache = cfg.teacher.cache if cfg.teacher is not None else None
    if cache is not None:
        log.info("teacher: reading its outputs from the cache %s (no audio is loaded)", cache)
    train_ds = av_dataset(paths.train, cfg.data, vocab, video=True, audio=teacher is not None and cache is None,
                          train=True, seed=cfg.train.seed)
    e = cfg.eval
    val = eval_loader(paths.val, cfg.data, vocab, e.batch_size, video=True, audio=False)
    options = {"beam_size": e.beam_size} if e.decoder == "beam" else (
        {"beam_size": e.beam_size, "ctc_weight": e.ctc_weight} if e.decoder == "joint" else {})
    evaluator = None
    if val is not None:
        def evaluator(module: RecognizerModule) -> dict[str, float]:
            return _scores(evaluate_lipreading(module.model, val, vocab, e.decoder, max_batches=e.max_batches,
                                                **options))
    log.info("student: %s-parameter lip reader; losses: %s", f"{sum(p.numel() for p in student_model.parameters()):,}",
             ", ".join(f"{s.label or s.name}×{s.weight:g}" for s in cfg.losses))
    start = time.perf_counter()
    out = Distiller(student, build_losses(cfg.losses), train_ds, cfg.train, run_dir,
                    teacher=cache if cache is not None else teacher,
                    evaluator=evaluator, config=cfg, teacher_fingerprint=fingerprint, resume=cfg.resume,
                    collate_fn=collate_av).fit()
    train_seconds = time.perf_counter() - start
    save_recognizer(student_model, run_dir / "lipreader.pt",
                    meta={"vocab": vocab.to_dict(), "video": to_dict(cfg.data.video)})

    results: dict[str, Any] = {"train_seconds": round(train_seconds, 1),
                               "teacher_path": None if teacher_file is None else str(teacher_file),
                               "student_params": sum(p.numel() for p in student_model.parameters()),
                               "train": {k: v for k, v in out.items() if isinstance(v, (int, float, str))}}
    test = eval_loader(paths.test, cfg.data, vocab, e.batch_size, video=True, audio=False)
    if test is not None:
        results["student"] = evaluate_lipreading(student_model, test, vocab, e.decoder, **options)
    if teacher_model is not None and paths.test is not None and getattr(teacher_model, "vocab_size", None):
        audio_test = eval_loader(paths.test, cfg.data, vocab, e.batch_size, video=False, audio=True)
        results["teacher"] = evaluate_lipreading(teacher_model, audio_test, vocab, "greedy", input_key="audio")
    atomic_write_json(run_dir / "results.json", results)
    for who in ("teacher", "student"):
        if who in results:
            r = results[who]
            log.info("%s test: CER %.4f, WER %.4f (%d utterances)", who, r["cer"], r["wer"], r["num_utterances"])
    return results
