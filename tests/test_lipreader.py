"""Lip-reader student: shapes with padding, exact masking, config, model files, and a LIBS training step."""

import pytest
import torch

from xmodal.adapters.speech import AudioAdapter, AudioContextAdapter, VideoAdapter, VideoContextAdapter
from xmodal.alignment import AlignmentSpace
from xmodal.errors import CheckpointError, ConfigError
from xmodal.losses import build_losses
from xmodal.nn.recognizer import RECOGNIZERS, build_recognizer, load_recognizer, save_recognizer
from xmodal.seqalign import lengths_to_mask
from xmodal.students.lipreader import LipReader, LipReaderConfig, tiny_lipreader_config
from xmodal.teachers.speech import SpeechRecognizer, SpeechRecognizerConfig


def video_batch(lengths=(8, 5), size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    video = torch.rand(len(lengths), t, 1, size, size, generator=g)
    mask = lengths_to_mask(torch.tensor(lengths), t)
    video[~mask] = 7.0  # padding content must not matter
    return video, mask


@pytest.mark.parametrize("encoder", ["transformer", "conformer"])
def test_lipreader_shapes_and_exact_padding(encoder):
    torch.manual_seed(0)
    model = LipReader(tiny_lipreader_config(encoder=encoder, conv_kernel=3)).eval()
    video, mask = video_batch()
    states, out_mask, logits = model(video, mask)
    assert states.shape == (2, 8, 64) and logits.shape == (2, 8, 30)
    assert torch.equal(out_mask, mask) and torch.all(states[~mask] == 0)
    alone = model(video[1:2, :5], mask[1:2, :5]).states
    assert torch.allclose(alone[0], states[1, :5], atol=1e-5)


def test_lipreader_trains_and_batchnorm_ignores_padding():
    torch.manual_seed(1)
    model = LipReader(tiny_lipreader_config())
    video, mask = video_batch((5, 3))
    states, m, logits = model(video, mask)
    tokens_in = torch.tensor([[1, 4, 5], [1, 6, 1]])
    dec_logits, hidden = model.decode_teacher_forced(states, m, tokens_in)
    assert dec_logits.shape == (2, 3, 30) and hidden.shape == (2, 3, 64)
    (logits.sum() + dec_logits.sum()).backward()
    assert model.visual.conv3d.weight.grad is not None and model.decoder.embed.weight.grad is not None
    # batch-norm statistics come from real frames only: a batch with extra padding updates them identically
    a, b = LipReader(tiny_lipreader_config()), LipReader(tiny_lipreader_config())
    b.load_state_dict(a.state_dict())
    v2 = torch.cat([video, torch.full((2, 4, 1, 16, 16), 3.0)], dim=1)
    a(video, mask)
    b(v2, torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1))
    bn_a, bn_b = a.visual.stem[0], b.visual.stem[0]
    assert torch.allclose(bn_a.running_mean, bn_b.running_mean, atol=1e-6)


def test_width_multiplier_and_config_errors():
    small = LipReader(tiny_lipreader_config(width_mult=0.125))
    wide = LipReader(tiny_lipreader_config(width_mult=0.25))
    count = lambda m: sum(p.numel() for p in m.visual.parameters())  # noqa: E731
    assert count(small) < count(wide)
    assert LipReaderConfig().channels() == [64, 128, 256, 512]
    with pytest.raises(ConfigError, match="four positive stage depths"):
        LipReaderConfig(blocks=(2, 2, 2))
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        LipReaderConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match=r"video \[B, T, 1, H, W\]"):
        LipReader(tiny_lipreader_config())(torch.randn(1, 4, 3, 16, 16))


def test_model_files_round_trip(tmp_path):
    model = LipReader(tiny_lipreader_config()).eval()
    path = tmp_path / "lip.pt"
    save_recognizer(model, path)
    loaded = load_recognizer(path)
    assert isinstance(loaded, LipReader) and loaded.config == model.config
    video, mask = video_batch((4, 2), size=16)
    assert torch.allclose(model(video, mask).ctc_logits, loaded(video, mask).ctc_logits, atol=1e-5)
    assert {"lipreader", "speech_recognizer"} <= set(RECOGNIZERS.names())
    with pytest.raises(CheckpointError, match="holds a 'lipreader' model, not a 'speech_recognizer'"):
        load_recognizer(path, kind="speech_recognizer")
    built = build_recognizer("lipreader", {"width_mult": 0.125, "dim": 32, "encoder": "transformer"})
    assert built.width == 32
    with pytest.raises(ConfigError, match="unknown key 'widht_mult'"):
        build_recognizer("lipreader", {"widht_mult": 0.5})


def test_libs_distillation_step_from_speech_teacher():
    """Teacher (audio, frozen) and student (video) through the alignment space, LIBS + hybrid losses."""
    torch.manual_seed(2)
    teacher = SpeechRecognizer(SpeechRecognizerConfig(n_mels=16, dim=32, encoder="transformer", num_layers=1,
                                                      ffn_dim=64, decoder_ffn_dim=64, dropout=0.0))
    student = LipReader(tiny_lipreader_config(dim=48))
    space = AlignmentSpace(dim=32)
    t_audio = space.attach("teacher", AudioAdapter(teacher, frozen=True))
    space.attach("teacher", AudioContextAdapter(t_audio))
    s_video = space.attach("student", VideoAdapter(student))
    space.attach("student", VideoContextAdapter(s_video))
    video, vmask = video_batch((6, 4), size=16)
    batch = {
        "video": video, "video_mask": vmask,
        "audio": torch.randn(2, 24, 16), "audio_mask": lengths_to_mask(torch.tensor([24, 16]), 24),
        "targets": torch.tensor([[4, 5, 6], [7, -1, -1]]), "target_lengths": torch.tensor([3, 1]),
    }
    losses = build_losses([
        {"name": "libs", "weight": 1.0, "params": {"aligner": "rate_stack", "filter": "soft"}},
        {"name": "ctc", "weight": 0.3},
        {"name": "attention_ce", "weight": 0.7},
        {"name": "ctc_kd", "weight": 0.5},
    ])
    out = losses(space.encode("student", batch), space.encode("teacher", batch), batch)
    assert torch.isfinite(out.loss)
    assert {"libs/frame", "libs/sequence", "libs/context", "libs/accept_rate", "ctc", "attention_ce"} <= set(out.parts)
    out.loss.backward()
    assert student.visual.conv3d.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert space.projections["student__video"].weight.grad is not None
