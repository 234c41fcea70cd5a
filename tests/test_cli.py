"""`stemsep separate` as a user runs it: a real process, real files, exit codes, one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import soundfile as sf

from stemsep.testing import FAST_CONFIG, make_model_files, tones

STEMSEP = [sys.executable, "-m", "stemsep.cli"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_files(tmp_path_factory.mktemp("model"), FAST_CONFIG, mask=1.0)


def run(args, model, **kwargs):
    checkpoint, config = model
    return subprocess.run([*STEMSEP, *args, "--checkpoint", str(checkpoint), "--config", str(config)],
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_several_inputs_one_model_load_outputs_listed_and_quiet_without_a_tty(model, tmp_path):
    a = tmp_path / "a.wav"
    b = tmp_path / "b.flac"
    sf.write(a, tones(44100, 44100, 2).T, 44100, subtype="PCM_16")
    sf.write(b, tones(48000, 48000, 1).T, 48000, subtype="PCM_24")
    out = tmp_path / "out"
    result = run(["separate", str(a), str(b), "-o", str(out), "--format", "flac"], model)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    expected = [out / n for n in ("a_vocals.flac", "a_instrumental.flac", "b_vocals.flac", "b_instrumental.flac")]
    assert result.stdout.split() == [str(p) for p in expected]
    assert sf.info(expected[2]).subtype == "PCM_24" and sf.info(expected[2]).channels == 1


def test_a_bad_input_gets_one_line_and_the_others_are_still_processed(model, tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, tones(44100, 44100, 2).T, 44100, subtype="PCM_16")
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(os.urandom(5000))
    out = tmp_path / "out"
    result = run(["separate", str(junk), str(tmp_path / "missing.wav"), str(good), "-o", str(out)], model)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("stemsep: error: ") for line in lines), result.stderr
    assert "junk.mp3" in lines[0] and "missing.wav" in lines[1]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good_instrumental.wav", "good_vocals.wav"]


def test_bad_model_files_and_bad_options_are_one_line_errors(model, tmp_path):
    song = tmp_path / "song.wav"
    sf.write(song, tones(44100, 44100, 2).T, 44100, subtype="PCM_16")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x00" * 100)
    result = subprocess.run([*STEMSEP, "separate", str(song), "--checkpoint", str(broken), "--config", str(model[1])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("stemsep: error: ") and "broken.ckpt" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    result = run(["separate", str(song), "--overlap", "40", "-o", str(tmp_path)], model)
    assert result.returncode == 1 and "overlap must be an integer from 1 to 16" in result.stderr
    result = run(["separate", str(song), "--format", "flac", "--bit-depth", "32", "-o", str(tmp_path)], model)
    assert result.returncode == 1 and "FLAC" in result.stderr
    assert not list(tmp_path.glob("song_*"))


def test_missing_default_weights_say_how_to_get_them(tmp_path):
    song = tmp_path / "song.wav"
    sf.write(song, tones(44100, 44100, 2).T, 44100, subtype="PCM_16")
    env = {**os.environ, "STEMSEP_WEIGHTS_DIR": str(tmp_path / "no-weights"), "STEMSEP_OFFLINE": "1"}
    result = subprocess.run([*STEMSEP, "separate", str(song)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"stemsep: error: model 1297 is not downloaded in {tmp_path}/no-weights, "
                                     "and offline mode forbids downloading it")


@pytest.mark.slow
def test_ctrl_c_stops_and_leaves_no_files(model, tmp_path):
    song = tmp_path / "long.wav"
    sf.write(song, tones(44100, 120 * 44100, 2).T, 44100, subtype="PCM_16")
    out = tmp_path / "out"
    checkpoint, config = model
    process = subprocess.Popen([*STEMSEP, "separate", str(song), "-o", str(out), "--overlap", "8",
                                "--checkpoint", str(checkpoint), "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # model loaded, chunks running
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip() == "stemsep: error: interrupted"
    assert list(out.iterdir()) == []


# folders, chosen stems, quality mode -------------------------------------------------------------


def test_a_folder_is_separated_recursively_mirrored_and_summarized(model, tmp_path):
    album = tmp_path / "album"
    (album / "disc 2").mkdir(parents=True)
    (album / "empty").mkdir()
    sf.write(album / "01 intro.wav", tones(44100, 22050, 2).T, 44100, subtype="PCM_16")
    sf.write(album / "disc 2" / "02 song.flac", tones(48000, 24000, 1).T, 48000, subtype="PCM_24")
    (album / "cover.txt").write_text("not audio")
    out = tmp_path / "out"
    result = run(["separate", str(album), "-o", str(out)], model)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(out / "01 intro_vocals.wav"), str(out / "01 intro_instrumental.wav"),
                                     str(out / "disc 2" / "02 song_vocals.wav"), str(out / "disc 2" / "02 song_instrumental.wav")]
    assert result.stderr.splitlines() == ["stemsep: skipping cover.txt: not audio",
                                          "stemsep: 2 separated, 1 skipped (not audio), 0 failed"]
    assert sf.info(out / "disc 2" / "02 song_vocals.wav").samplerate == 48000


def test_an_empty_folder_separates_nothing_and_succeeds(model, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run(["separate", str(tmp_path / "empty"), "-o", str(tmp_path / "out")], model)
    assert result.returncode == 0 and result.stdout == ""
    assert result.stderr.strip() == "stemsep: 0 separated, 0 skipped (not audio), 0 failed"


def test_an_unreadable_subfolder_is_a_failure_and_the_rest_is_separated(model, tmp_path, monkeypatch, capsys):
    """Run in this process, so that as root (who reads any folder) the refusal is made by
    os.scandir raising what it raises for everyone else."""
    from stemsep import cli

    album = tmp_path / "album"
    locked = album / "locked"
    locked.mkdir(parents=True)
    sf.write(album / "a.wav", tones(44100, 22050, 2).T, 44100, subtype="PCM_16")
    sf.write(locked / "b.wav", tones(44100, 22050, 2).T, 44100, subtype="PCM_16")
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root
        real_scandir = os.scandir

        def scandir(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        code = cli.main(["separate", str(album), "-o", str(tmp_path / "out"),
                         "--checkpoint", str(model[0]), "--config", str(model[1])])
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 1
    assert f"stemsep: error: cannot read folder {locked} (Permission denied)" in err.splitlines()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_instrumental.wav", "a_vocals.wav"]


def test_chosen_stems_write_only_those_and_an_unknown_one_lists_the_models(model, tmp_path):
    song = tmp_path / "song.wav"
    sf.write(song, tones(44100, 22050, 2).T, 44100, subtype="PCM_16")
    result = run(["separate", str(song), "-o", str(tmp_path / "out"), "--stems", "instrumental"], model)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["song_instrumental.wav"]
    result = run(["separate", str(song), "-o", str(tmp_path / "out2"), "--stems", "vocals,drums"], model)
    assert result.returncode == 1
    assert result.stderr.strip() == ("stemsep: error: unknown stem 'drums': this model gives vocals, instrumental, "
                                     "and no_<stem> for the mix without one of them")
    assert not (tmp_path / "out2").exists()
