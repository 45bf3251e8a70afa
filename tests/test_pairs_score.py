"""sipo-pairs score: DIR/scores.jsonl is complete, resumable after a kill, and checked against its
candidates (other candidates, changed or deleted images); video candidates average frames."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sipo_plugin.data.errors import PairDataError
from sipo_plugin.data.video import save_clip
from sipo_plugin.pairs.candidates import Candidate, append_candidate, candidate_id
from sipo_plugin.pairs.cli import main
from sipo_plugin.pairs.score import (SCORES_FILE, ScoresError, content_identity, read_scores,
                                     score_candidates)
from sipo_plugin.rewards import build_reward
from tiny_rewards import save_tiny_pickscore
from tiny_video import write_frame_folder, write_video

CALLS = {"n": 0, "fail_at": None}


def red(images, prompts):
    """User reward: mean red value / 255; counts its calls and can be told to die mid-run."""
    CALLS["n"] += 1
    if CALLS["fail_at"] is not None and CALLS["n"] >= CALLS["fail_at"]:
        raise KeyboardInterrupt  # a kill between two batches
    return [float(np.asarray(img)[..., 0].mean() / 255) for img in images]


def green(images, prompts):
    return [float(np.asarray(img)[..., 1].mean() / 255) for img in images]


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.update(n=0, fail_at=None)


def write_candidates(folder, reds, *, latents=False, size=8):
    """One prompt per row of ``reds``; candidate c of prompt p is a solid image of red value
    reds[p][c]. Returns the folder."""
    from sipo_plugin.utils.io import save_safetensors_atomic
    import torch
    folder.mkdir(parents=True, exist_ok=True)
    for p, row in enumerate(reds):
        for c, value in enumerate(row):
            cid = candidate_id(p, c)
            path = f"images/{cid}.png"
            (folder / "images").mkdir(exist_ok=True)
            Image.new("RGB", (size, size), (int(value), 40, 0)).save(folder / path)
            lat = None
            if latents:
                lat = f"latents/{cid}.safetensors"
                save_safetensors_atomic({"latents": torch.full((4, 2, 2), float(value))},
                                        folder / lat)
            append_candidate(folder, Candidate(id=cid, prompt=f"a cat number {p}", prompt_index=p,
                                               candidate_index=c, seed=p * 10 + c, path=path,
                                               latents=lat))
    return folder


REDS = [[0, 51, 102, 153], [255, 204, 0, 51], [10, 20, 30, 40]]


def test_scores_every_candidate_once_with_every_reward(tmp_path):
    folder = write_candidates(tmp_path / "c", REDS)
    rewards = [build_reward("test_pairs_score:red", device="cpu"),
               build_reward("test_pairs_score:green", device="cpu")]
    scores = score_candidates(folder, rewards, batch_size=5, progress=False)
    assert len(scores) == 12 and CALLS["n"] == 3  # ceil(12 / 5) batches
    assert scores["p00001-c01"]["test_pairs_score:red"] == pytest.approx(204 / 255)
    assert scores["p00001-c01"]["test_pairs_score:green"] == pytest.approx(40 / 255)
    lines = [json.loads(line) for line in (folder / SCORES_FILE).read_text().splitlines()]
    assert len(lines) == 12
    assert lines[0]["image"] == content_identity(folder / "images/p00000-c00.png")
    assert score_candidates(folder, rewards[:1], progress=False) == scores  # nothing left to do
    assert CALLS["n"] == 3


def test_a_killed_run_resumes_without_redoing_finished_batches(tmp_path):
    folder = write_candidates(tmp_path / "c", REDS)
    fresh = shutil.copytree(folder, tmp_path / "fresh")
    reward = build_reward("test_pairs_score:red", device="cpu")
    CALLS["fail_at"] = 3  # batches 1 and 2 finish, the third is killed
    with pytest.raises(KeyboardInterrupt):
        score_candidates(folder, [reward], batch_size=4, progress=False)
    assert len(read_scores(folder)) == 8
    with open(folder / SCORES_FILE, "a") as f:
        f.write('{"id": "p00002-c00", "image": "12:ab')  # a line cut off by the kill
    CALLS.update(n=0, fail_at=None)
    resumed = score_candidates(folder, [reward], batch_size=4, progress=False)
    assert CALLS["n"] == 1  # only the unfinished batch
    assert resumed == score_candidates(fresh, [reward], batch_size=4, progress=False)
    text = (folder / SCORES_FILE).read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 12  # the partial line was cut off


def test_scores_of_other_candidates_or_changed_images_are_caught(tmp_path):
    reward = build_reward("test_pairs_score:red", device="cpu")
    a = write_candidates(tmp_path / "a", REDS)
    b = write_candidates(tmp_path / "b", [[1, 2, 3, 4]] * 3)
    score_candidates(a, [reward], progress=False)
    shutil.copy(a / SCORES_FILE, b / SCORES_FILE)  # same ids p00000-c00 ..., other images
    with pytest.raises(ScoresError, match="changed since it was scored.*12 of 12 scored images "
                       "differ: if all, the file is from other candidates") as info:
        read_scores(b)
    assert str(b / "images/p00000-c00.png") in str(info.value)
    c = write_candidates(tmp_path / "c", [[1]])
    shutil.copy(a / SCORES_FILE, c / SCORES_FILE)  # ids c does not have
    with pytest.raises(ScoresError, match="not in .*candidates.jsonl: the scores are from other"):
        read_scores(c)
    # an image changed between steps: score rescores it (and only it), then the file is good
    Image.new("RGB", (8, 8), (255, 40, 0)).save(a / "images/p00000-c00.png")
    with pytest.raises(ScoresError, match="re-run `sipo-pairs score"):
        read_scores(a)
    CALLS["n"] = 0
    scores = score_candidates(a, [reward], progress=False)
    assert CALLS["n"] == 1 and scores["p00000-c00"][reward.name] == pytest.approx(1.0)
    (a / "images/p00000-c01.png").unlink()
    with pytest.raises(PairDataError, match="p00000-c01.png: candidate image missing"):
        read_scores(a)


def test_another_model_under_the_same_name_is_refused(tmp_path):
    folder = write_candidates(tmp_path / "c", [[1, 2]])
    score_candidates(folder, [build_reward("test_pairs_score:red", device="cpu")], progress=False)
    other = build_reward("test_pairs_score:red", device="cpu")
    other = type(other)(name=other.name, spec="red=/another/model", fn=other.fn, device=other.device)
    with pytest.raises(ScoresError, match="was scored with .*now 'red=/another/model'"):
        score_candidates(folder, [other], progress=False)


def test_video_candidates_score_the_mean_of_every_kth_frame(tmp_path):
    folder = tmp_path / "v"
    frames = np.zeros((9, 8, 8, 3), np.uint8)
    frames[..., 0] = (np.arange(9) * 25)[:, None, None]  # red 0, 25, ..., 200
    write_frame_folder(folder / "clips/p00000-c00", frames)
    write_video(folder / "clips/p00000-c01.mp4", frames)
    save_clip(frames, folder / "clips/p00000-c02.gif")  # what `sipo-pairs sample` writes
    for c, path in enumerate(["clips/p00000-c00", "clips/p00000-c01.mp4",
                              "clips/p00000-c02.gif"]):
        append_candidate(folder, Candidate(id=candidate_id(0, c), prompt="x", prompt_index=0,
                                           candidate_index=c, seed=c, path=path))
    scores = score_candidates(folder, [build_reward("test_pairs_score:red", device="cpu")],
                              frame_stride=4, batch_size=2, progress=False)
    expected = (0 + 100 + 200) / 3 / 255  # frames 0, 4, 8
    assert scores["p00000-c00"]["test_pairs_score:red"] == pytest.approx(expected)
    assert scores["p00000-c01"]["test_pairs_score:red"] == pytest.approx(expected, abs=2 / 255)
    assert scores["p00000-c02"]["test_pairs_score:red"] == pytest.approx(expected, abs=2 / 255)


def test_command_line_scores_with_a_tiny_pickscore_and_reports_bad_input(tmp_path, capsys):
    folder = write_candidates(tmp_path / "c", REDS[:2], size=40)
    model = save_tiny_pickscore(tmp_path / "PickScore_v1")
    assert main(["score", "--candidates", str(folder), "--reward", f"pickscore={model}",
                 "--reward", "colour", "--device", "cpu", "--batch_size", "3"]) == 0
    scores = read_scores(folder)
    assert len(scores) == 8 and set(scores["p00000-c00"]) == {"pickscore", "colour"}
    assert len({round(s["pickscore"], 6) for s in scores.values()}) > 1
    capsys.readouterr()
    assert main(["score", "--candidates", str(folder), "--reward",
                 f"pickscore={tmp_path / 'nowhere'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "nowhere") in err
    (folder / "images/p00001-c03.png").unlink()
    assert main(["score", "--candidates", str(folder), "--reward", "size"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "p00001-c03.png: candidate image missing" in err
