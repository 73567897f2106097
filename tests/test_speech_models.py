"""Speech-recogniser teacher, wav2vec2 loader (locally created weights) and the audio adapters."""

import pytest
import torch

from xmodal.adapters import ADAPTERS
from xmodal.adapters.speech import AudioAdapter, AudioContextAdapter
from xmodal.alignment import AlignmentSpace
from xmodal.data.vocab import CharVocab
from xmodal.errors import CheckpointError, ConfigError, DataError
from xmodal.models import create_teacher
from xmodal.nn.recognizer import save_recognizer
from xmodal.seqalign import lengths_to_mask
from xmodal.teachers.speech import (
    WAV2VEC2_ARCHS,
    SpeechRecognizer,
    SpeechRecognizerConfig,
    load_speech_recognizer,
    load_wav2vec2,
    save_wav2vec2,
    wav2vec2_label_map,
)


def tiny_cfg(**kw):
    base = dict(n_mels=20, dim=32, num_layers=2, num_heads=4, ffn_dim=64, decoder_ffn_dim=64, conv_kernel=5,
                dropout=0.0)
    base.update(kw)
    return SpeechRecognizerConfig(**base)


@pytest.mark.parametrize("encoder,factor", [("conformer", 4), ("transformer", 2), ("conformer", 1)])
def test_speech_recognizer_shapes_and_exact_padding(encoder, factor):
    torch.manual_seed(0)
    model = SpeechRecognizer(tiny_cfg(encoder=encoder, subsampling=factor)).eval()
    x = torch.randn(2, 23, 20)
    mask = lengths_to_mask(torch.tensor([23, 13]), 23)
    x[1, 13:] = 50.0  # padding content must not matter
    states, out_mask, logits = model(x, mask)
    t = -(-23 // factor)
    assert states.shape == (2, t, 32) and logits.shape == (2, t, 30)
    assert out_mask.sum(1).tolist() == [t, -(-13 // factor)]
    assert torch.all(states[~out_mask] == 0)
    alone, alone_mask, _ = model(x[1:2, :13], mask[1:2, :13])
    n = int(alone_mask.sum())
    assert torch.allclose(alone[0, :n], states[1, :n], atol=1e-5)


def test_speech_recognizer_decoder_and_training_step():
    torch.manual_seed(1)
    model = SpeechRecognizer(tiny_cfg())
    states, mask, _ = model(torch.randn(2, 16, 20), lengths_to_mask(torch.tensor([16, 12]), 16))
    logits, hidden = model.decode_teacher_forced(states, mask, torch.tensor([[1, 5, 6], [1, 7, 1]]))
    assert logits.shape == (2, 3, 30) and hidden.shape == (2, 3, 32)
    logits.sum().backward()
    assert model.subsample.convs[0].weight.grad is not None


def test_config_validation():
    with pytest.raises(ConfigError, match="subsampling must be 1, 2 or 4"):
        tiny_cfg(subsampling=3)
    with pytest.raises(ConfigError, match="did you mean 'conformer'"):
        tiny_cfg(encoder="conformr")
    with pytest.raises(ValueError, match=r"fbank features \[B, T, 20\]"):
        SpeechRecognizer(tiny_cfg())(torch.randn(1, 10, 40))


def test_save_and_load_speech_recognizer(tmp_path):
    torch.manual_seed(2)
    model = SpeechRecognizer(tiny_cfg(encoder="transformer")).eval()
    path = tmp_path / "asr.pt"
    save_recognizer(model, path)
    loaded = create_teacher({"kind": "speech", "path": str(path)})
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(1, 12, 20)
    assert torch.allclose(model(x).ctc_logits, loaded(x).ctc_logits, atol=1e-5)
    assert loaded.fingerprint == load_speech_recognizer(path).fingerprint
    with pytest.raises(CheckpointError, match="not found"):
        load_speech_recognizer(tmp_path / "missing.pt")


# ---------------------------------------------------------------- wav2vec2


W2V_CFG = dict(
    extractor_mode="group_norm", extractor_conv_layer_config=[(8, 10, 5), (8, 3, 2)], extractor_conv_bias=False,
    encoder_embed_dim=16, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=3, encoder_pos_conv_groups=2,
    encoder_num_layers=1, encoder_num_heads=2, encoder_attention_dropout=0.0, encoder_ff_interm_features=32,
    encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0,
    aux_num_out=6,
)


def tiny_wav2vec2(seed=0):
    from torchaudio.models import wav2vec2_model

    torch.manual_seed(seed)
    return wav2vec2_model(**W2V_CFG).eval()


def test_wav2vec2_round_trip_from_local_file(tmp_path):
    model = tiny_wav2vec2()
    path = tmp_path / "w2v.pt"
    save_wav2vec2(model, path, W2V_CFG, labels=["-", "|", "E", "T", "A", "'"])
    enc = create_teacher({"kind": "wav2vec2", "path": str(path)}, family="speech")
    wave = torch.randn(2, 800)
    mask = lengths_to_mask(torch.tensor([800, 500]), 800)
    states, out_mask, logits = enc(wave, mask)
    ref_logits, ref_len = model(wave.masked_fill(~mask, 0.0), torch.tensor([800, 500]))
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert out_mask.sum(1).tolist() == ref_len.tolist()
    assert enc.width == 16 and states.shape[-1] == 16
    assert not any(p.requires_grad for p in enc.parameters())


def test_wav2vec2_by_architecture_name_with_state_dict(tmp_path, monkeypatch):
    from torchaudio.models import wav2vec2_model

    def tiny_arch(aux_num_out=None):
        return wav2vec2_model(**{**W2V_CFG, "aux_num_out": aux_num_out})

    monkeypatch.setitem(WAV2VEC2_ARCHS._items, "tiny_w2v", tiny_arch)
    model = tiny_wav2vec2(1)
    path = tmp_path / "sd.pt"
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, path)  # torchaudio bundle prefix
    enc = load_wav2vec2("tiny_w2v", checkpoint=str(path))
    wave = torch.randn(1, 600)
    assert torch.allclose(enc(wave).ctc_logits, model(wave)[0], atol=1e-5)
    with pytest.raises(ConfigError, match="needs checkpoint="):
        load_wav2vec2("tiny_w2v")
    with pytest.raises(CheckpointError, match="does not say its architecture"):
        load_wav2vec2(str(path))
    with pytest.raises(ConfigError, match="did you mean 'wav2vec2_base'"):
        load_wav2vec2("wav2vec2_bse")
    with pytest.raises(CheckpointError, match="not found"):
        load_wav2vec2(str(tmp_path / "nope.pt"))


def test_wav2vec2_label_map_reorders_logits(tmp_path):
    labels = ["-", "|", "E", "T", "A", "'"]
    tokens = CharVocab("' aet").tokens  # blank, sos/eos, ', space, a, e, t
    mapping = wav2vec2_label_map(labels, tokens)
    assert mapping == [0, -1, 5, 1, 4, 2, 3]
    model = tiny_wav2vec2(2)
    path = tmp_path / "w2v.pt"
    save_wav2vec2(model, path, W2V_CFG, labels=labels)
    enc = load_wav2vec2(str(path), vocab_tokens=tokens)
    wave = torch.randn(1, 400)
    raw = model(wave)[0]
    logits = enc(wave).ctc_logits
    assert logits.shape[-1] == len(tokens)
    assert torch.allclose(logits[..., 4], raw[..., 4]) and torch.allclose(logits[..., 3], raw[..., 1])
    assert torch.all(logits[..., 1] == -1e4)


# ---------------------------------------------------------------- adapters


def test_audio_adapter_features_and_context_reuse():
    torch.manual_seed(3)
    model = SpeechRecognizer(tiny_cfg(encoder="transformer"))
    assert {"audio", "video", "audio_context", "video_context"} <= set(ADAPTERS.names())
    space = AlignmentSpace(dim=24)
    audio = space.attach("teacher", AudioAdapter(model, frozen=True))
    ctx = space.attach("teacher", AudioContextAdapter(audio))
    calls = []
    model.subsample.register_forward_hook(lambda *a: calls.append(1))
    batch = {"audio": torch.randn(2, 16, 20), "audio_mask": lengths_to_mask(torch.tensor([16, 8]), 16),
             "targets": torch.tensor([[5, 6, 7], [8, -1, -1]])}
    out = space.encode("teacher", batch)
    assert len(calls) == 1  # the context adapter reused the encoder pass
    f, c = out["audio"].view("projected"), out["audio_context"].view("projected")
    assert f.tokens.shape == (2, 4, 24) and f.pooled.shape == (2, 24) and f.logits.shape == (2, 4, 30)
    assert f.mask.sum(1).tolist() == [4, 2]
    assert c.tokens.shape == (2, 4, 24) and c.mask.sum(1).tolist() == [4, 2] and c.logits.shape == (2, 4, 30)
    assert not any(p.requires_grad for p in model.parameters())  # the frozen teacher; projections train
    native = audio.encode(batch)
    m = native.mask.float().unsqueeze(-1)
    assert torch.allclose(native.pooled, (native.tokens * m).sum(1) / m.sum(1), atol=1e-6)
    assert "encoder" in dict(ctx.named_children()) and "source" not in dict(ctx.named_children())
    with pytest.raises(DataError, match="reads batch\\['audio'\\]"):
        audio({"video": torch.zeros(1)})
    with pytest.raises(DataError, match="bool \\[B, T\\] mask"):
        audio({"audio": torch.randn(1, 8, 20), "audio_mask": torch.ones(1, 7, dtype=torch.bool)})


def test_wav2vec2_audio_shorter_than_its_receptive_field_is_a_named_error():
    from xmodal.teachers.speech import Wav2Vec2Encoder

    enc = Wav2Vec2Encoder(tiny_wav2vec2())
    assert enc.min_samples == 1 + 9 * 1 + 2 * 5  # kernels 10 (stride 5) then 3 (stride 2)
    assert enc.sample_rate == 16000
    wave = torch.randn(2, 200)
    states, out_mask, _ = enc(wave, lengths_to_mask(torch.tensor([200, 20]), 200))
    assert out_mask.sum(1).tolist() == [out_mask.sum(1)[0].item(), 1]  # exactly the field: one frame
    with pytest.raises(DataError, match=r"utterance 1 of the batch has 19 audio samples.*receptive field of 20"):
        enc(wave, lengths_to_mask(torch.tensor([200, 19]), 200))
