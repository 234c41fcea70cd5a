"""`stemsep ui` in a real browser: headless Chromium driven by Playwright against the
command's own server, running a constructed checkpoint (vocals = 0.3 x the mix).

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` package; Playwright's
own browser download is not used. Set STEMSEP_UI_SCREENSHOT=docs/ui-mixer.png to also
write the README's screenshot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from playwright import sync_api

from stemsep import testing

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
pytestmark = [
    pytest.mark.slow,
    # .ci/run installs it; elsewhere the test is skipped, never on CI.
    pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"), reason="needs Debian's chromium at /usr/bin/chromium"),
]


def practice_song(path: Path, seconds: float = 6.0, rate: int = 44100) -> Path:
    """Tones in a beat: the waveforms show the rhythm."""
    frames = int(seconds * rate)
    t = np.arange(frames) / rate
    beat = (0.35 + 0.65 * np.exp(-8 * (t % 0.5)))[None, :]
    sf.write(path, (testing.tones(rate, frames, 2, level=0.8) * beat).T, rate, subtype="PCM_16")
    return path


@pytest.fixture
def server(tmp_path):
    """`stemsep ui` on a free port with a constructed checkpoint: (its address, its output folder)."""
    checkpoint, config = testing.make_model_files(tmp_path / "model", testing.FAST_CONFIG, mask=0.3)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "stemsep.cli", "ui", "--no-browser", "--port", "0", "-o", str(out),
         "--checkpoint", str(checkpoint), "--config", str(config), "--overlap", "1", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline()
    assert line.startswith("stemsep ui: http://127.0.0.1:"), process.stderr.read()
    yield line.split()[2], out, (checkpoint, config)
    process.terminate()
    process.wait(30)


def test_separate_mix_and_download_in_a_real_browser(server, tmp_path):
    url, out, model_files = server
    song = practice_song(tmp_path / "practice song.wav")
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a song\n" * 20)
    requests: list[str] = []
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900}).new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(url)
        page.wait_for_selector("#model option", state="attached")
        assert page.locator("#model").input_value() == "custom"
        stems_offered = page.locator("#stem-choices input").evaluate_all("boxes => boxes.map(b => b.value)")
        assert stems_offered == ["vocals", "instrumental", "no_vocals", "no_instrumental"]

        # separate
        page.set_input_files("#file", str(song))
        page.click("#start")
        page.wait_for_selector("#play:not([disabled])", timeout=120_000)
        rows = page.locator("#stem-rows .stem")
        assert rows.count() == 2
        for index, name in enumerate(["vocals", "instrumental"]):
            row = rows.nth(index)
            assert row.locator(".stem-name").inner_text() == name
            assert row.locator(".volume").is_visible() and row.locator(".mute").is_visible()
            assert row.locator(".solo").is_visible() and row.locator(".wave").is_visible()
        assert page.locator("#queue .job.done").count() == 1
        assert page.locator("#time").inner_text() == "0:00 / 0:06"

        def worklet() -> dict:
            return page.evaluate("() => window.stemsepMixer.state()")

        # mute and solo set the worklet's own gains
        assert worklet()["gains"] == [1, 1] and worklet()["stems"] == 2
        rows.nth(0).locator(".mute").click()
        assert worklet()["gains"] == [0, 1]
        assert rows.nth(0).locator(".mute").get_attribute("aria-pressed") == "true"
        rows.nth(0).locator(".mute").click()
        rows.nth(0).locator(".solo").click()
        assert worklet()["gains"] == [1, 0]
        rows.nth(0).locator(".solo").click()
        rows.nth(1).locator(".volume").fill("0.5")
        assert worklet()["gains"] == [1, 0.5]
        rows.nth(1).locator(".volume").fill("1")

        # one transport: play, the space bar pauses, at 75% speed (time-stretched) it plays on
        page.click("#play")
        page.wait_for_function("async () => (await window.stemsepMixer.state()).frame > 4410")
        page.keyboard.press("Space")
        page.wait_for_function("async () => !(await window.stemsepMixer.state()).playing")
        paused_at = worklet()["frame"]
        page.locator("#speed").fill("0.75")
        page.keyboard.press("Space")
        page.wait_for_function(f"async () => (await window.stemsepMixer.state()).frame > {paused_at} + 4410")
        page.keyboard.press("Space")
        assert worklet()["speed"] == 0.75

        # the record and the files on disk
        [folder] = [d for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")]
        on_disk = {stem: folder / f"practice song_{stem}.wav" for stem in ("vocals", "instrumental")}

        # download a stem: byte for byte the file on disk
        with page.expect_download() as download:
            rows.nth(0).locator(".download").click()
        assert Path(download.value.path()).read_bytes() == on_disk["vocals"].read_bytes()
        assert download.value.suggested_filename == "practice song_vocals.wav"

        # the exported mix at unity gains is the song, bit for bit; with the vocals muted, the instrumental
        for gains, expected in (("1,1", song), ("0,1", on_disk["instrumental"])):
            if gains == "0,1":
                rows.nth(0).locator(".mute").click()
            with page.expect_download() as download:
                page.click("#export")
            assert download.value.suggested_filename == "practice song_mix.wav"
            assert np.array_equal(sf.read(download.value.path(), dtype="int16")[0], sf.read(expected, dtype="int16")[0])
        rows.nth(0).locator(".mute").click()

        # drag across a waveform: that region loops
        box = rows.nth(1).locator(".wave").bounding_box()
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + 0.3 * box["width"], y)
        page.mouse.down()
        page.mouse.move(box["x"] + 0.45 * box["width"], y, steps=5)
        page.mouse.move(box["x"] + 0.55 * box["width"], y, steps=5)
        page.mouse.up()
        loop = worklet()["loop"]
        assert loop["enabled"] and page.locator("#loop").is_checked()
        assert loop["start"] == pytest.approx(0.3 * 6 * 44100, rel=0.02) and loop["end"] == pytest.approx(0.55 * 6 * 44100, rel=0.02)
        assert loop["start"] <= worklet()["frame"] <= loop["end"]

        shot = tmp_path / "mixer.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("STEMSEP_UI_SCREENSHOT"):
            page.locator("#mixer").screenshot(path=os.environ["STEMSEP_UI_SCREENSHOT"])

        # a file that is not audio: the library's one sentence on the page
        page.set_input_files("#file", str(notes))
        page.click("#start")
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
        shown = page.locator("#error").inner_text()
        browser.close()

    from stemsep import Separator, errors

    with pytest.raises(errors.NotAudioError) as expected:
        Separator(*model_files, device="cpu").separate(notes, tmp_path / "direct")
    assert shown == str(expected.value)
    origin = url.split("/")[2]
    assert [r for r in requests if r.split("/")[2] != origin] == []  # nothing from another host
    assert problems == []
    assert list((out / ".uploads").rglob("*")) == []  # uploads removed once separated


STRETCH = """async ([speed, frequency]) => {
  // the page's own worklet in an offline context: a sine as the one stem, played at `speed`
  const rate = 44100;
  const context = new OfflineAudioContext({ numberOfChannels: 2, length: 2 * rate, sampleRate: rate });
  await context.audioWorklet.addModule("/static/mixer-worklet.js");
  const node = new AudioWorkletNode(context, "stemsep-mixer", { numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [2] });
  node.connect(context.destination);
  const tone = new Float32Array(4 * rate).map((_, i) => 0.5 * Math.sin((2 * Math.PI * frequency * i) / rate));
  const states = [];
  node.port.onmessage = (event) => event.data.type === "state" && states.push(event.data);
  const loaded = context.suspend(128 / rate).then(() => new Promise((resolve) => {
    for (const message of [{ type: "reset", count: 1, length: tone.length }, { type: "stem", index: 0, channels: [tone] },
                           { type: "speed", speed }, { type: "play" }, { type: "state" }]) node.port.postMessage(message);
    const wait = () => (states.length ? resolve(context.resume()) : setTimeout(wait, 5));
    wait();
  }));
  const rendered = await context.startRendering();
  await loaded;
  node.port.postMessage({ type: "state" });
  while (states.length < 2) await new Promise((resolve) => setTimeout(resolve, 10));
  return { left: Array.from(rendered.getChannelData(0)), frame: states[1].frame };
}"""


def test_slower_or_faster_playback_keeps_the_pitch(server):
    """The mixer's time stretch (WSOLA) on a 440 Hz sine: still 440 Hz at its level with no
    clicks, while the playhead moves at the chosen speed."""
    url, _, _ = server
    rate, frequency, amplitude = 44100, 440, 0.5
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(url)
        results = {speed: page.evaluate(STRETCH, [speed, frequency]) for speed in (0.5, 0.75, 1.25)}
        browser.close()
    steepest = 2 * np.pi * frequency / rate * amplitude  # the sine's largest step from one sample to the next
    for speed, result in results.items():
        x = np.array(result["left"][rate // 2 : 3 * rate // 2])  # one second, past the first frames
        spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        assert np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)] == pytest.approx(frequency, abs=1)
        assert np.sqrt(np.mean(x**2)) == pytest.approx(amplitude / np.sqrt(2), rel=0.01)
        assert np.abs(np.diff(x)).max() <= 1.05 * steepest
        assert result["frame"] == pytest.approx(speed * len(result["left"]), rel=0.03)
