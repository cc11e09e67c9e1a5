"""train data path: PyAV decode at an fps, Qwen's resize + patch layout, chat tokens/labels, skips."""

import json

import pytest
import torch

from model import tiny_qwen2_5_vl_config
from train.dataset import LlavaVideoDataset, SampleError, SyntheticDataset, collate
from train.sampler import SampleStream
from train.synthetic_videos import write_llava_dataset, write_video
from train.tokenizer import ByteTokenizer
from train.video import patchify, read_frames, smart_resize, video_to_pixels

CONFIG = tiny_qwen2_5_vl_config()
SMALL = {"min_pixels": 56 * 56, "max_pixels": 56 * 56}  # 4x4 patches per frame


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return write_llava_dataset(root, 4, frames=8, fps=4)


def test_frames_sampled_at_fps(tmp_path):
    path = write_video(tmp_path / "v.mkv", frames=8, fps=4)
    every = read_frames(path, fps=4, max_frames=100)
    half = read_frames(path, fps=2, max_frames=100)
    assert every.shape == (8, 3, 64, 64) and every.dtype == torch.uint8
    assert torch.equal(half, every[::2])
    assert read_frames(path, fps=4, max_frames=3).shape[0] == 3
    assert not torch.equal(every[0], every[1])  # the pattern moves


def test_smart_resize_rules():
    assert smart_resize(64, 64, 28, 56 * 56, 56 * 56) == (56, 56)
    h, w = smart_resize(480, 640, 28, 128 * 28 * 28, 768 * 28 * 28)
    assert h % 28 == 0 and w % 28 == 0 and 128 * 28 * 28 <= h * w <= 768 * 28 * 28
    assert abs(w / h - 640 / 480) < 0.1
    assert smart_resize(10, 10, 28, 56 * 56, 10**6) == (56, 56)


def test_patch_layout_matches_processor():
    """Row (t, bh, bw, mh, mw) holds columns (channel, frame-in-patch, y, x), as Qwen2VLVideoProcessor."""
    p, m, tp = 14, 2, 2
    video = torch.randn(3, 3, 56, 28)  # 3 frames: the last is repeated to make 2 temporal patches
    rows, grid = patchify(video, p, m, tp)
    assert grid == (2, 4, 2) and rows.shape == (16, 3 * tp * p * p)
    padded = torch.cat([video, video[-1:]])
    r = 0
    for t in range(2):
        for bh in range(2):
            for bw in range(1):
                for mh in range(m):
                    for mw in range(m):
                        y, x = (bh * m + mh) * p, (bw * m + mw) * p
                        expect = padded[t * tp : (t + 1) * tp, :, y : y + p, x : x + p].permute(1, 0, 2, 3)
                        assert torch.equal(rows[r], expect.reshape(-1)), r
                        r += 1


def test_pixels_normalised_with_clip_stats():
    white = torch.full((2, 3, 56, 56), 255, dtype=torch.uint8)
    rows, grid = video_to_pixels(white, CONFIG.vision_config, **SMALL)
    assert grid == (1, 4, 4)
    assert torch.allclose(rows[0, 0], torch.tensor((1 - 0.48145466) / 0.26862954))


def test_sample_tokens_and_labels(videos):
    tokenizer = ByteTokenizer(CONFIG)
    dataset = LlavaVideoDataset(videos, CONFIG, tokenizer, fps=2, **SMALL)
    sample = dataset[1]
    ids, labels = sample["input_ids"], sample["labels"]
    assert sample["video_grid_thw"].tolist() == [[2, 4, 4]]  # 4 frames at 2 fps -> 2 temporal patches
    assert sample["pixel_values_videos"].shape == (32, 1176)
    start = ids.tolist().index(CONFIG.vision_start_token_id)
    assert ids[start + 1 : start + 9].tolist() == [CONFIG.video_token_id] * 8
    assert ids[start + 9] == CONFIG.vision_end_token_id
    assert (ids == CONFIG.video_token_id).sum() == 8
    answer = tokenizer.encode("Square 1 moves right.") + [tokenizer.special.eos]
    assert labels[labels != -100].tolist() == answer
    assert int(ids.max()) < CONFIG.text_config.vocab_size
    batch = collate([dataset[0], dataset[1]], CONFIG, tokenizer.special.pad)
    assert batch["mm_token_type_ids"].sum() == 2 * 8 * 2  # video type id is 2
    assert batch["video_grid_thw"].shape == (2, 3)


def test_bad_and_long_samples(videos, tmp_path):
    entries = json.loads(videos.read_text())
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video" * 10)
    entries[1]["video"] = str(tmp_path / "missing.mp4")
    entries[2]["video"] = str(tmp_path / "corrupt.mp4")
    annotation = tmp_path / "bad.json"
    annotation.write_text(json.dumps(entries))
    dataset = LlavaVideoDataset(annotation, CONFIG, ByteTokenizer(CONFIG), video_root=videos.parent, fps=2, **SMALL)
    for index, match in ((1, "not found"), (2, "cannot decode")):
        with pytest.raises(SampleError, match=match) as info:
            dataset[index]
        assert info.value.kind == "bad_video"
    stream = SampleStream(dataset, rank=0, world_size=1, seed=0, shuffle=False)
    got = stream.take(2)
    assert len(got) == 2 and stream.skipped == {"bad_video": 2}
    with pytest.raises(RuntimeError, match="on_bad_video = 'error'"):
        SampleStream(dataset, rank=0, world_size=1, seed=0, shuffle=False, on_bad_video="error").take(2)
    dataset.max_length = 20
    with pytest.raises(RuntimeError, match="in a row failed"):
        SampleStream(dataset, rank=0, world_size=1, seed=0).take(1)


def test_stream_splits_ranks_and_resumes():
    dataset = SyntheticDataset(CONFIG, count=7, max_length=30)
    streams = [SampleStream(dataset, rank=r, world_size=2, seed=3) for r in range(2)]
    order = [[s.index_at(i) for i in range(3)] for s in streams]
    assert sorted(order[0] + order[1]) == sorted(set(order[0] + order[1]))  # disjoint within an epoch
    first = streams[0].take(4)
    state = streams[0].state_dict()
    after = streams[0].take(3)
    fresh = SampleStream(dataset, rank=0, world_size=2, seed=3)
    fresh.load_state_dict(state)
    for a, b in zip(after, fresh.take(3)):
        assert torch.equal(a["input_ids"], b["input_ids"])
    assert len(first) == 4


class FailsAt:
    """A dataset whose sample ``bad`` raises a non-sample error (a bug, not a bad video) and whose
    samples in ``skip`` are unusable (counted skips)."""

    def __init__(self, dataset, bad: int, skip=()):
        self.dataset, self.bad, self.skip = dataset, bad, skip

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index == self.bad:
            raise OSError(f"disk error reading sample {index}")
        if index in self.skip:
            raise SampleError("bad_video", f"sample {index} does not decode")
        return self.dataset[index]


def ids_of(batch):
    return batch["input_ids"].tolist()


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_batches_and_resume_point_match_the_stream(depth):
    """Read ahead or not, the micro-batches come in the stream's order, and the checkpointed state
    is the one after the last batch taken (not the thread's read position), so a resume continues
    exactly there."""
    from train.prefetch import BatchPrefetcher

    dataset = SyntheticDataset(CONFIG, count=7, max_length=30)
    build = lambda samples: collate(samples, CONFIG, pad_id=0)  # noqa: E731
    expected = SampleStream(dataset, rank=0, world_size=1, seed=3)
    batches = BatchPrefetcher(SampleStream(dataset, rank=0, world_size=1, seed=3), 2, build, depth)
    try:
        for _ in range(3):
            assert ids_of(batches.next()) == ids_of(build(expected.take(2)))
        state = batches.state_dict()
        assert state == expected.state_dict()  # position 6, although the thread has read further
        resumed_stream = SampleStream(dataset, rank=0, world_size=1, seed=3)
        resumed_stream.load_state_dict(state)
        resumed = BatchPrefetcher(resumed_stream, 2, build, depth)
        try:
            assert ids_of(resumed.next()) == ids_of(batches.next()) == ids_of(build(expected.take(2)))
        finally:
            resumed.close()
    finally:
        batches.close()


def test_prefetch_raises_errors_at_their_batch_and_counts_only_taken_skips():
    from train.prefetch import BatchPrefetcher

    base = SyntheticDataset(CONFIG, count=8, max_length=30)
    stream = SampleStream(FailsAt(base, bad=6, skip=(1, 4)), rank=0, world_size=1, seed=0, shuffle=False)
    batches = BatchPrefetcher(stream, 2, lambda s: collate(s, CONFIG, pad_id=0), depth=2)
    try:
        batches.next()  # samples 0, 2 (1 skipped)
        assert batches.skipped["bad_video"] == 1  # whatever the thread has read since (sample 4 too)
        batches.next()  # samples 3, 5 (4 skipped)
        assert batches.skipped["bad_video"] == 2 and batches.state_dict()["position"] == 6
        with pytest.raises(OSError, match="disk error reading sample 6"):
            batches.next()
    finally:
        batches.close()
    with pytest.raises(ValueError, match="data.prefetch must be >= 0"):
        BatchPrefetcher(stream, 2, lambda s: s, depth=-1)
