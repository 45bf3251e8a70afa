"""The labelling server over HTTP: every endpoint, undo, bad requests, concurrent clients, the
labels file (append-only, fsynced, torn tail cut), the folder lock, kill and resume."""

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from label_helpers import (ROOT, api, label_current, prefer_by_colour, request, running_server,
                           start_cli, write_candidates)

from sipo_plugin.pairs.label.store import LABELS_FILE, LabelLog, LabelsError, read_labels

def _lines(folder):
    return (folder / LABELS_FILE).read_bytes()


def _label_until_done(base, records, state):
    while state["pair"]:
        status, state = label_current(base, state, prefer_by_colour(records, state["pair"]))
        assert status == 200, state
    return state


def test_page_and_assets_are_local(tmp_path):
    write_candidates(tmp_path, [2])
    with running_server(tmp_path) as (base, _):
        status, headers, page = request(base + "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assets = re.findall(rb'(?:src|href)="([^"]+)"', page)
        assert assets and all(a.startswith(b"/static/") for a in assets)  # no CDN
        for asset in assets:
            status, headers, body = request(base + asset.decode())
            assert status == 200 and body and b"http://" not in body and b"https://" not in body
        assert request(base + "/static/../server.py")[0] == 404
        assert request(base + "/nowhere")[0] == 404


def test_label_is_on_disk_before_the_next_pair(tmp_path):
    records = write_candidates(tmp_path, [2, 3])
    with running_server(tmp_path) as (base, _):
        status, state = api(base + "/api/state")
        assert status == 200 and state["progress"]["total"] == {"done": 0, "planned": 4}
        assert state["progress"]["prompt"] == {"done": 0, "planned": 1}
        first = state["pair"]
        assert first["prompt"] == "a red disc, take 0" and first["left"]["kind"] == "image"
        assert {m["id"] for m in state["preload"]} <= {r.id for r in records[2:]}
        status, state = label_current(base, state, "left")
        assert status == 200 and state["progress"]["total"]["done"] == 1
        seed, labels = read_labels(tmp_path)  # what the server acknowledged is in the file
        assert seed == 0 and [(la.left, la.right, la.outcome) for la in labels] == [
            (first["left"]["id"], first["right"]["id"], "left")]
        assert state["pair"]["prompt_index"] == 1 and state["last"]["id"] == labels[0].id
        _label_until_done(base, records, state)
        status, state = api(base + "/api/state")
        assert state["pair"] is None and state["progress"]["prompts_done"] == 2


def test_bad_requests_write_nothing(tmp_path):
    records = write_candidates(tmp_path, [2, 2])
    with running_server(tmp_path) as (base, _):
        _, state = api(base + "/api/state")
        done = state["pair"]
        _, state = label_current(base, state, "left")
        before = _lines(tmp_path)
        pair = state["pair"]
        ok = {"left": pair["left"]["id"], "right": pair["right"]["id"], "outcome": "left"}
        cases = [
            (400, dict(raw=b"{not json")),
            (400, dict(raw=b"[1, 2]")),
            (415, dict(body=ok, content_type="text/plain")),
            (400, dict(body={**ok, "outcome": "maybe"})),
            (400, dict(body={**ok, "left": "p99999-c00"})),
            (400, dict(body={**ok, "right": records[0].id})),  # another prompt's candidate
            (400, dict(body={**ok, "right": ok["left"]})),
            (409, dict(body={**ok, "left": done["left"]["id"], "right": done["right"]["id"]})),
            (404, dict(body={})),
        ]
        for expected, kwargs in cases:
            url = base + ("/api/nothing" if expected == 404 else "/api/label")
            status, payload = api(url, **kwargs)
            assert status == expected and isinstance(payload["error"], str), (kwargs, payload)
        assert _lines(tmp_path) == before
    write_candidates(tmp_path / "fresh", [2])
    with running_server(tmp_path / "fresh") as (base, _):
        status, payload = api(base + "/api/undo", {})
        assert status == 409 and "nothing to undo" in payload["error"]


def test_undo_appends_a_record_and_shows_the_pair_again(tmp_path):
    write_candidates(tmp_path, [3, 2])
    with running_server(tmp_path) as (base, _):
        _, state = api(base + "/api/state")
        shown = state["pair"]
        _, state = label_current(base, state, "right")
        written = _lines(tmp_path)
        status, state = api(base + "/api/undo", {})
        assert status == 200 and state["pair"] == shown and state["last"] is None
        assert state["progress"]["total"]["done"] == 0
        after = _lines(tmp_path)
        assert after.startswith(written)  # never rewritten: one undo line appended
        undo = json.loads(after[len(written):])
        assert undo["type"] == "undo" and undo["undoes"] == state["undone"]["id"]
        assert read_labels(tmp_path)[1] == []
        status, state = label_current(base, state, "tie")
        assert status == 200 and [la.outcome for la in read_labels(tmp_path)[1]] == ["tie"]


def test_media_images_video_ranges_and_frame_folders(tmp_path):
    records = write_candidates(tmp_path, [2])
    video = tmp_path / "images" / "p00000-c00.mp4"
    video.write_bytes(bytes(range(256)) * 4)
    frames = tmp_path / "images" / "p00000-c01"
    frames.mkdir()
    for n in range(3):
        (frames / f"{n:03d}.png").write_bytes(f"frame{n}".encode())
    lines = (tmp_path / "candidates.jsonl").read_text().splitlines()
    lines = [lines[0].replace("p00000-c00.png", "p00000-c00.mp4"),
             lines[1].replace("images/p00000-c01.png", "images/p00000-c01")]
    (tmp_path / "candidates.jsonl").write_text("\n".join(lines) + "\n")
    with running_server(tmp_path) as (base, _):
        _, state = api(base + "/api/state")
        media = {m["id"]: m for m in (state["pair"]["left"], state["pair"]["right"])}
        assert media[records[0].id]["kind"] == "video"
        assert media[records[1].id] == {"id": records[1].id, "kind": "frames", "fps": 8,
                                        "frames": [f"/media/{records[1].id}/{n}" for n in range(3)]}
        status, headers, body = request(base + media[records[0].id]["src"])
        assert status == 200 and headers["Content-Type"] == "video/mp4" and len(body) == 1024
        status, headers, body = request(base + media[records[0].id]["src"],
                                        headers={"Range": "bytes=10-19"})
        assert status == 206 and body == bytes(range(10, 20))
        assert headers["Content-Range"] == "bytes 10-19/1024"
        status, _, body = request(base + media[records[0].id]["src"], headers={"Range": "bytes=-4"})
        assert status == 206 and body == bytes(range(252, 256))
        assert request(base + media[records[0].id]["src"],
                       headers={"Range": "bytes=2000-"})[0] == 416
        assert request(base + f"/media/{records[1].id}/1")[2] == b"frame1"
        assert request(base + f"/media/{records[1].id}/3")[0] == 404
        assert request(base + "/media/p00042-c00")[0] == 404


def test_png_bytes_are_served_as_written(tmp_path):
    records = write_candidates(tmp_path, [2])
    with running_server(tmp_path) as (base, _):
        status, headers, body = request(f"{base}/media/{records[0].id}")
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert body == (tmp_path / records[0].path).read_bytes()


def test_two_concurrent_clients_label_each_pair_once(tmp_path):
    records = write_candidates(tmp_path, [4, 6, 3, 8])
    results = {"ok": 0, "conflict": 0}
    lock = threading.Lock()

    def client(base):
        _, state = api(base + "/api/state")
        while state["pair"]:
            status, payload = label_current(base, state, prefer_by_colour(records, state["pair"]))
            assert status in (200, 409), payload
            with lock:
                results["ok" if status == 200 else "conflict"] += 1
            state = payload if status == 200 else payload["state"]

    with running_server(tmp_path) as (base, session):
        threads = [threading.Thread(target=client, args=(base,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        planned = session.state()["progress"]["total"]["planned"]
    _, labels = read_labels(tmp_path)
    keys = [tuple(sorted((la.left, la.right))) for la in labels]
    assert len(keys) == len(set(keys)) == results["ok"] == planned
    assert results["conflict"] >= 0 and all(line.endswith(b"}") for line in
                                            _lines(tmp_path).splitlines())


def test_restart_resumes_the_same_schedule(tmp_path):
    records = write_candidates(tmp_path, [8, 5])
    reference = tmp_path / "reference"
    write_candidates(reference, [8, 5])
    with running_server(reference, seed=7) as (base, _):
        _, state = api(base + "/api/state")
        shown_uninterrupted = []
        while state["pair"]:
            shown_uninterrupted.append(state["pair"])
            _, state = label_current(base, state, prefer_by_colour(records, state["pair"]))
    shown = []
    for stop_after in (3, 7, None):  # three sessions on one folder
        with running_server(tmp_path, seed=7 if stop_after == 3 else None) as (base, _):
            _, state = api(base + "/api/state")
            while state["pair"] and len(shown) != stop_after:
                shown.append(state["pair"])
                _, state = label_current(base, state, prefer_by_colour(records, state["pair"]))
    assert shown == shown_uninterrupted and len(shown) > 7
    with pytest.raises(LabelsError, match="labelled with --seed 7, not 1"):
        LabelLog(tmp_path, seed=1)


def test_torn_last_line_is_cut_and_lock_is_exclusive(tmp_path):
    write_candidates(tmp_path, [2, 2])
    log = LabelLog(tmp_path, owner="server one")
    log.add_label(0, "p00000-c00", "p00000-c01", "left")
    with pytest.raises(LabelsError, match="being labelled by server one"):
        LabelLog(tmp_path)
    log.close()
    with open(tmp_path / LABELS_FILE, "ab") as f:
        f.write(b'{"type": "label", "id": "Lx", "prom')  # killed mid-write
    assert len(read_labels(tmp_path)[1]) == 1
    log = LabelLog(tmp_path)
    assert log.torn_bytes == 35 and _lines(tmp_path).endswith(b"}\n")
    log.close()
    with open(tmp_path / LABELS_FILE, "ab") as f:
        f.write(b"garbage\n")
    with pytest.raises(LabelsError, match=r"labels.jsonl:3: not a label record"):
        read_labels(tmp_path)


def test_cli_second_server_refused_kill_and_resume(tmp_path):
    records = write_candidates(tmp_path, [2, 2, 2])
    process, base = start_cli(tmp_path)
    try:
        _, state = api(base + "/api/state")
        status, state = label_current(base, state, prefer_by_colour(records, state["pair"]))
        assert status == 200
        second = subprocess.run([sys.executable, "-m", "sipo_plugin.pairs", "label",
                                 "--candidates", str(tmp_path)], capture_output=True, text=True,
                                cwd=ROOT, timeout=60)
        assert second.returncode == 2
        assert re.fullmatch(r"error: \S+labels.lock: this folder is being labelled by "
                            r"`sipo-pairs label` \(pid \d+\); .*\n", second.stderr)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    process, base = start_cli(tmp_path)  # the kernel released the dead server's lock
    try:
        _, state = api(base + "/api/state")
        assert state["progress"]["total"] == {"done": 1, "planned": 3}
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0 and "--from-labels" in out


def test_cli_one_line_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "sipo_plugin.pairs", "label", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    result = run("--candidates", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "sipo-pairs sample" in result.stderr
    write_candidates(tmp_path, [2])
    (tmp_path / "images" / "p00000-c01.png").unlink()
    result = run("--candidates", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "p00000-c01.png: candidate p00000-c01 has no file (1 of 2 missing)" in result.stderr


def test_cli_host_other_than_loopback_warns_in_one_line(tmp_path):
    write_candidates(tmp_path, [2])
    process, base = start_cli(tmp_path, "--host", "0.0.0.0")
    port = base.rsplit(":", 1)[1]
    assert api(f"http://127.0.0.1:{port}/api/state")[0] == 200
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert re.fullmatch(rf"warning: --host 0.0.0.0 serves this page to every machine that can "
                        rf"reach port {port}: .*\n", err)
