"""Whole-piece encoding (tiles and overlapping windows), checkpoint resolution, and the
reconstruct round trip to MIDI on a tiny trained run."""
from pathlib import Path

import pytest
import symusic
import torch
from tiny_runs import isolated, trained_run

from midi_rae.cli import main
from midi_rae.config import load_config
from midi_rae.encode import Embeddings, encode, encode_roll
from midi_rae.models import build_encoder
from midi_rae.metrics import note_onsets
from midi_rae.reconstruct import reconstruct_roll, render_wav
from midi_rae.roll import midi_to_roll
from midi_rae.runs import load_autoencoder, load_encoder, resolve_checkpoint, stage_dirs
from midi_rae.swin import SwinEncoder


@pytest.fixture(autouse=True)
def one_thread_own_rng():
    with isolated():
        yield


def swin(width: int = 32) -> torch.nn.Module:
    cfg = load_config(None, [f"data.crop_width={width}", "model.depths=[1,1,1]", "model.num_heads=[1,2,4]",
                             "model.window_size=4"])
    return build_encoder(cfg).eval()


def long_midi(path: Path, beats: int = 25) -> Path:
    """A melody of `beats` quarter notes (4 steps each): 100 steps, longer than a 32-step window."""
    score = symusic.Score(480)
    track = symusic.Track("t", 0, False)
    for b in range(beats):
        track.notes.append(symusic.Note(b * 480, 480, 60 + b % 12, 90))
    score.tracks.append(track)
    score.dump_midi(str(path))
    return path


@pytest.mark.parametrize("hop", [None, 16])
def test_positions_cover_a_long_piece(hop: int | None) -> None:
    enc = swin()
    T = 150  # 4.7 windows of 32 steps
    roll = (torch.rand(1, 128, T, generator=torch.Generator().manual_seed(0)) > 0.95).float()
    e = encode_roll(enc, roll, hop)
    assert [lvl.info for lvl in e.levels] == enc.feature_info and e.steps == T
    for lvl in e.levels:
        (gh, _), (dh, dw) = lvl.info.grid_size, lvl.info.downsample
        want = {(r * dh, t) for r in range(gh) for t in range(0, T, dw)}  # every token start inside the piece, once
        got = [tuple(p) for p in lvl.pos.tolist()]
        assert len(got) == len(set(got)) and set(got) == want
        assert lvl.emb.shape == (len(want), lvl.info.dim) and lvl.non_empty.shape == (len(want),)
    # A tile's tokens are exactly the encoder's output for that window.
    fine = e.levels[-1]
    if hop is None:
        direct = enc(roll[None, :, :, 64:96]).patches.finest.emb[0]
        sel = (fine.pos[:, 1] >= 64) & (fine.pos[:, 1] < 96)
        assert torch.allclose(fine.emb[sel], direct, atol=1e-5)
    else:  # overlapping windows: tokens at steps 40..55 are most central in the window starting at 32
        direct = enc(roll[None, :, :, 32:64]).patches.finest
        sel = (fine.pos[:, 1] >= 40) & (fine.pos[:, 1] < 56)
        cols = (direct.pos[:, 1] >= 2) & (direct.pos[:, 1] < 6)
        assert torch.allclose(fine.emb[sel], direct.emb[0][cols], atol=1e-5)


def test_time_stage_tokens_are_stitched_and_saved(tmp_path: Path) -> None:
    """An encoder with a time stage: its tokens, one per finest column, cover the piece once and
    are the window's own (tiles); they survive a save / load; a file without them loads as before."""
    cfg = load_config(None, ["data.crop_width=32", "model.depths=[1,1,1]", "model.num_heads=[1,2,4]",
                             "model.window_size=4", "model.time_stage_dim=8", "model.time_stage_heads=2"])
    enc = build_encoder(cfg).eval()
    T = 150
    roll = (torch.rand(1, 128, T, generator=torch.Generator().manual_seed(0)) > 0.95).float()
    e = encode_roll(enc, roll)
    cols = enc.grid_size[1]
    assert e.time.info.grid_size == (1, cols) and e.time.info.downsample == (128, 32 // cols)
    assert e.time.pos.tolist() == [[0, t] for t in range(0, T, 32 // cols)] and e.time.emb.shape[1] == 8
    direct = enc(roll[None, :, :, 64:96]).time.emb[0]  # (cols, 8)
    sel = (e.time.pos[:, 1] >= 64) & (e.time.pos[:, 1] < 96)
    assert torch.allclose(e.time.emb[sel], direct, atol=1e-5)
    back = Embeddings.load(e.save(tmp_path / "t.safetensors"))
    assert back.time.info == e.time.info and torch.equal(back.time.emb, e.time.emb)
    assert Embeddings.load(encode_roll(swin(), roll).save(tmp_path / "p.safetensors")).time is None


def test_a_module_in_training_mode_is_encoded_as_in_eval_and_left_as_it_was() -> None:
    """encode() of a module handed over mid-training (drop path on): the embeddings are the eval
    ones, not a random draw, and the module stays in training mode."""
    enc = SwinEncoder(img_height=128, img_width=32, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4,
                      drop_path_rate=0.5)
    with torch.no_grad():  # the V2 blocks' branches start at zero (their post-norms' weights): give them some
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    roll = (torch.rand(1, 128, 64) > 0.97).float()
    expect = encode(roll, enc.eval())[0]
    got = encode(roll, enc.train())[0]
    assert enc.training
    assert all(torch.equal(a.emb, b.emb) for a, b in zip(got.levels, expect.levels))


def test_hop_must_keep_grids_aligned() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        encode_roll(swin(), torch.zeros(1, 128, 40), hop=8)


def test_vit_global_token_one_per_window() -> None:
    cfg = load_config(None, ["model.encoder=vit", "data.crop_width=32", "model.patch_h=8", "model.patch_w=8",
                             "model.embed_dim=16", "model.num_heads=2", "model.depth=1"])
    e = encode_roll(build_encoder(cfg).eval(), torch.zeros(128, 70))
    assert e.levels[0].pos.tolist() == [[0, 0], [0, 32], [0, 64]]
    assert e.levels[1].pos[:, 1].max() == 64 and len(e.levels[1].pos) == 16 * 9


def test_checkpoint_forms_resolve_to_the_same_encoder(tiny_cache: Path, tmp_path_factory) -> None:
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    ck = resolve_checkpoint(run)
    assert ck.encoder.path == run / "pretrain" / "encoder.safetensors" and ck.decoder.path.name == "decoder.safetensors"
    step = next((run / "pretrain" / "checkpoints").glob("step_*"))
    ref = load_encoder(run)[0].state_dict()
    for form in (run / "pretrain", run / "pretrain" / "encoder.safetensors", run / "decoder" / "decoder.safetensors",
                 step, step / "model.safetensors"):
        sd = load_encoder(form)[0].state_dict()
        assert all(torch.equal(sd[k], v) for k, v in ref.items()), form
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_checkpoint(run / "missing")


def test_encode_cli_and_api(tiny_cache: Path, tmp_path_factory, tmp_path: Path) -> None:
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    mid = long_midi(tmp_path / "tune.mid")
    assert main(["encode", str(run), str(mid), "-o", str(tmp_path / "emb")]) == 0
    e = Embeddings.load(tmp_path / "emb" / "tune.safetensors")
    assert e.steps == 100 and e.window == 32 and e.hop == 32 and e.meta["title"] == "tune"
    for lvl in e.levels:  # the last token of every level reaches the piece's end
        assert lvl.pos[:, 1].max() == (100 - 1) // lvl.info.downsample[1] * lvl.info.downsample[1]
        assert lvl.non_empty.any() and lvl.emb.dtype == torch.float32
    api = encode(mid, run)[0]
    assert all(torch.equal(a.emb, b.emb) and torch.equal(a.pos, b.pos) for a, b in zip(api.levels, e.levels))
    # Pieces of a prepared cache, by id pattern, into a folder.
    assert main(["encode", str(run), "*/p0*", "--cache-dir", str(tiny_cache), "-o", str(tmp_path / "cache_emb")]) == 0
    files = sorted((tmp_path / "cache_emb").glob("*.safetensors"))
    assert len(files) == 10 and Embeddings.load(files[0]).meta["piece_id"].endswith("p00.mid")


def test_reconstruct_round_trip(tiny_cache: Path, tmp_path_factory, tmp_path: Path, capsys) -> None:
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    mid = long_midi(tmp_path / "in.mid")
    out, png = tmp_path / "out.mid", tmp_path / "cmp.png"
    assert main(["reconstruct", str(run), str(mid), "-o", str(out), "--png", str(png), "--threshold", "0.3"]) == 0
    score = symusic.Score(str(out))  # a valid MIDI file
    assert score.end() == 100 * score.ticks_per_quarter // 4  # same length as the input (100 steps)
    probs = reconstruct_roll(load_autoencoder(run)[0], midi_to_roll(mid))  # the same through the Python API
    assert probs.shape == (1, 128, 100) and ((probs >= 0) & (probs <= 1)).all()
    assert score.note_num() == int(note_onsets(probs > 0.3).sum())  # every predicted note is in the file
    assert png.stat().st_size > 1000


def test_wav_without_fluidsynth_says_how_to_install(tiny_cache: Path, tmp_path_factory, tmp_path: Path,
                                                    monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no fluidsynth on PATH
    with pytest.raises(RuntimeError, match="apt-get install fluidsynth fluid-soundfont-gm"):
        render_wav(tmp_path / "x.mid", tmp_path / "x.wav")
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    mid = long_midi(tmp_path / "in.mid")
    code = main(["reconstruct", str(run), str(mid), "-o", str(tmp_path / "out.mid"), "--wav", str(tmp_path / "o.wav")])
    assert code != 0 and (tmp_path / "out.mid").exists() and "fluidsynth" in capsys.readouterr().err


def test_a_failed_render_leaves_the_wav_there_whole(tmp_path: Path, monkeypatch) -> None:
    """fluidsynth exiting with an error after half a file: one RuntimeError line with its message,
    and a WAV already at the path stays as it was (before, it was overwritten in place and the
    CalledProcessError escaped as a traceback)."""
    fake = tmp_path / "bin" / "fluidsynth"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "-F" ]; do shift; done\nprintf RIFFhalf > "$2"\n'
                    'echo "fluidsynth: error: cannot open soundfont" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    (tmp_path / "x.sf2").write_bytes(b"sf")
    wav = tmp_path / "x.wav"
    wav.write_bytes(b"OLDWAV")
    with pytest.raises(RuntimeError, match="fluidsynth failed \\(exit status 1\\): fluidsynth: error: cannot open soundfont"):
        render_wav(tmp_path / "x.mid", wav, soundfont=str(tmp_path / "x.sf2"))
    assert wav.read_bytes() == b"OLDWAV" and sorted(p.name for p in tmp_path.iterdir()) == ["bin", "x.sf2", "x.wav"]


@pytest.mark.parametrize("flag, name", [("--png", "fig.mid"), ("--wav", "out.mid"), ("--wav", "a.png")])
def test_reconstruct_outputs_need_their_own_suffix(flag: str, name: str, tiny_cache: Path, tmp_path_factory,
                                                   tmp_path: Path, capsys) -> None:
    """A figure or audio name of another type (the MIDI's own, for one) is refused before the model runs."""
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    mid = long_midi(tmp_path / "in.mid")
    assert main(["reconstruct", str(run), str(mid), "-o", str(tmp_path / "out.mid"), flag, str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} {tmp_path / name}: give a" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mid"]
    assert main(["reconstruct", str(run), str(tmp_path), "-o", str(tmp_path / "out.mid")]) == 2  # a folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a file: reconstruct reads one music file" in err[0]


def test_reconstruct_keeps_tempo_and_meter(tmp_path: Path) -> None:
    from midi_rae.reconstruct import write_midi

    src = symusic.Score(480)
    src.tempos.extend([symusic.Tempo(0, qpm=90.0), symusic.Tempo(8 * 480, qpm=60.0)])  # slows down at beat 8
    src.time_signatures.append(symusic.TimeSignature(0, 3, 4))
    track = symusic.Track("t", 0, False)
    track.notes.append(symusic.Note(0, 480, 60, 90))
    src.tracks.append(track)
    src.dump_midi(str(tmp_path / "in.mid"))
    probs = torch.zeros(1, 128, 64)
    probs[0, 60, :4] = 1.0
    out = symusic.Score(str(write_midi(probs, tmp_path / "out.mid", 0.5, like=tmp_path / "in.mid"))).to("quarter")
    assert [(t.time, round(t.qpm)) for t in out.tempos] == [(0.0, 90), (8.0, 60)]
    assert [(t.time, t.numerator, t.denominator) for t in out.time_signatures] == [(0.0, 3, 4)]


def test_decoder_trained_into_another_run_finds_its_encoder(tiny_cache: Path, tmp_path_factory, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from midi_rae.stages import train_decoder

    run = trained_run("swin", tiny_cache, tmp_path_factory)
    cfg = load_config(None, [
        "name=other", f"out_dir={tmp_path / 'runs'}", f"data.cache_dir={tiny_cache}", "data.val_fraction=0.2",
        "data.val_max_items=4", "decoder_train.batch_size=4", "decoder_train.max_steps=1", "decoder_train.warmup_steps=1",
        "decoder_train.progress=false", "decoder_train.tensorboard=false", "decoder_train.threads=1"])
    with isolated():
        train_decoder(cfg, run / "pretrain")
    other = tmp_path / "runs" / "other"
    assert not (other / "pretrain").exists()
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # the encoder is found from any working folder
    ck = resolve_checkpoint(other)
    assert ck.encoder.path.resolve() == (run / "pretrain" / "encoder.safetensors").resolve()
    assert (load_autoencoder(stage_dirs(cfg)[2] / "decoder.safetensors")[0].encoder.state_dict().keys()
            == load_autoencoder(ck)[0].encoder.state_dict().keys())
    assert main(["eval", str(other), "-o", str(tmp_path / "eval"), "--max-items", "4", "--examples", "1"]) == 0
