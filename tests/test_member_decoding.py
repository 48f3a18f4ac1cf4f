"""Ensemble members decoded together share the query encoder and skip convolutions (issue 13)."""

from __future__ import annotations

import numpy as np
import torch
from helpers import TINY_CONFIG, disk_example

from promptseg import Segmenter
from promptseg.engine.backends import create_backend
from promptseg.engine.backends.torch_backends import stack_encodings, token_count_groups
from promptseg.engine.ensemble import (
    build_ensemble,
    flipped,
    mean_probabilities,
    member_probabilities,
    plan_members,
)
from promptseg.model import PromptSegNet
from promptseg.model.member_decoding import (
    decode_feature_mean,
    decode_member_groups,
    shared_skip_up,
)


def tiny_model() -> PromptSegNet:
    torch.manual_seed(0)
    return PromptSegNet(TINY_CONFIG).eval()


def prompts(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size = TINY_CONFIG.resolution
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(1, count, 3, size, size, generator=generator)
    maps = (torch.rand(1, count, size, size, generator=generator) > 0.6).float()
    return images, maps, torch.ones(1, count, dtype=torch.long)


def test_shared_skip_up_equals_the_block_on_repeated_skips() -> None:
    up = tiny_model().query_decoder.ups[1]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(
        3 * 2, up.fuse[0].in_channels - 16, 8, 8, generator=generator
    )  # G = 3 members, B = 2
    skip = torch.randn(2, 16, 16, 16, generator=generator)
    with torch.inference_mode():
        torch.testing.assert_close(
            shared_skip_up(up, x, skip, 3), up(x, skip.repeat(3, 1, 1, 1)), rtol=0, atol=1e-5
        )


def test_member_groups_decode_as_each_group_alone() -> None:
    model = tiny_model()
    images, maps, types = prompts(4)
    queries = torch.rand(2, 3, TINY_CONFIG.resolution, TINY_CONFIG.resolution)
    with torch.inference_mode():
        encodings = [
            model.encode_prompts(images[:, keep], maps[:, keep], types[:, keep])
            for keep in ([0, 1, 2], [1, 2, 3], [0, 2, 3])
        ]
        got = decode_member_groups(
            model, model.query_features(queries), queries, stack_encodings(encodings)
        )
        for member, encoding in zip(got, encodings):
            torch.testing.assert_close(member, model.decode(queries, encoding), rtol=0, atol=1e-5)


def test_backend_groups_members_by_token_count_and_keeps_their_order() -> None:
    model = tiny_model()
    backend = create_backend("torch", model, "cpu")
    images, maps, types = prompts(4)
    full = backend.encode(images, maps, types)
    subsets = [
        backend.select_prompts(full, [i for i in range(4) if i != held], 4) for held in (2, 0)
    ]
    states = [subsets[0], full, subsets[1]]
    assert token_count_groups(states) == [[0, 2], [1]]
    queries = torch.rand(3, 3, TINY_CONFIG.resolution, TINY_CONFIG.resolution)
    together = backend.decode_members(queries, states)
    assert together.shape == (3, 3, TINY_CONFIG.resolution, TINY_CONFIG.resolution)
    for member, state in zip(together, states):
        torch.testing.assert_close(member, backend.decode(queries, state), rtol=0, atol=1e-5)
    assert torch.equal(backend.decode_members(queries, [full])[0], backend.decode(queries, full))


def test_feature_mean_of_one_member_or_of_copies_is_that_members_decode() -> None:
    model = tiny_model()
    images, maps, types = prompts(3)
    queries = torch.rand(2, 3, TINY_CONFIG.resolution, TINY_CONFIG.resolution)
    with torch.inference_mode():
        encoding = model.encode_prompts(images, maps, types)
        features = model.query_features(queries)
        alone = model.decode(queries, encoding)
        one = decode_feature_mean(model, features, queries, [encoding])
        torch.testing.assert_close(one, alone, rtol=0, atol=1e-6)
        copies = [stack_encodings([encoding, encoding]), encoding]  # 3 identical members, 2 groups
        torch.testing.assert_close(
            decode_feature_mean(model, features, queries, copies), alone, rtol=0, atol=1e-5
        )


def test_ensemble_mean_falls_back_to_the_members_average_without_decode_mean() -> None:
    model = tiny_model()
    backend = create_backend("torch", model, "cpu")
    images, maps, types = prompts(4)

    def encode(flip: tuple[int, ...], keep: tuple[int, ...]):
        index = list(keep)
        return backend.encode(
            flipped(images[:, index], flip), flipped(maps[:, index], flip), types[:, index]
        )

    ensemble = build_ensemble(backend, images, maps, types, plan_members(4, 6), encode)
    queries = torch.rand(2, 3, TINY_CONFIG.resolution, TINY_CONFIG.resolution)
    averaged = member_probabilities(ensemble, queries, backend.decode_members).mean(0)
    fallback = mean_probabilities(
        ensemble, queries, lambda view, states: None, backend.decode_members
    )
    torch.testing.assert_close(fallback, averaged, rtol=0, atol=1e-6)
    featured = mean_probabilities(ensemble, queries, backend.decode_mean, backend.decode_members)
    assert backend.decodes_means() and [m.flip for m in ensemble.members] == [()] * 5 + [(-1,)]
    t = ensemble.temperature
    plain = torch.sigmoid(backend.decode_mean(queries, list(ensemble.states[:5])) / t)
    mirrored = flipped(
        torch.sigmoid(backend.decode_mean(flipped(queries, (-1,)), [ensemble.states[5]]) / t), (-1,)
    )
    torch.testing.assert_close(featured, (5 * plain + mirrored) / 6, rtol=0, atol=1e-6)


def test_segmenter_decodes_members_only_for_member_maps() -> None:
    model = tiny_model()
    rng = np.random.default_rng(3)
    pairs = [disk_example(rng, (36, 40)) for _ in range(4)]
    images, masks = [i for i, _ in pairs], [m for _, m in pairs]
    volume = np.stack(images[:3], axis=2).astype(np.float32)
    mean_only = Segmenter(model, device="cpu", ensemble=4)
    with_members = Segmenter(model, device="cpu", ensemble=4, member_maps=True)
    lean = mean_only.segment_volume(volume, mean_only.encode_prompts(images, masks))
    full = with_members.segment_volume(volume, with_members.encode_prompts(images, masks))
    assert lean.variance is None and full.variance is not None
    assert full.variance.shape == volume.shape
    np.testing.assert_array_equal(lean.probabilities, full.probabilities)
