"""Cost of one correction round on a 128 px query with the prompts cached (issue 18 item 3).

Encodes four 128 x 128 prompts once with the shipped weights, segments a 128 x 128 query, then times
Segmenter.refine with one click at the centre of the largest error region (as `eval --interactive`
clicks; back to the model's prediction once no error is left) for --rounds rounds, and prints the
median and the 95th percentile in milliseconds, beside the cached decode of the query. With weights
that read corrections (--checkpoint of a query-corrections model), a round is what
`segment --correct` does with them: the model segments the query again with every click so far,
then the local edit (`Segmenter.refine(..., prompts=...)`).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/engine/correction_round.py --rounds 50
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from promptseg.data.synthetic import phantom_volume
from promptseg.engine.segmenter import Segmenter
from promptseg.eval.interactive import next_click
from promptseg.model.weights import packaged_weights_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--checkpoint", default=None, help="weights (default: the shipped ones)")
    args = parser.parse_args()
    volume, labels = phantom_volume(np.random.default_rng(0), (24, args.size, args.size))
    truth = labels > 0
    weights = args.checkpoint or packaged_weights_path()
    segmenter = Segmenter.from_checkpoint(weights, device="cpu", backend="torch")
    with_model = segmenter.corrects_with_model
    prompts = segmenter.encode_prompts(
        volume[[6, 9, 14, 17]], truth[[6, 9, 14, 17]].astype(np.uint8)
    )
    query = volume[12]
    decode = []
    for _ in range(5):
        start = time.perf_counter()
        probabilities = segmenter.segment([query], prompts)[0]
        decode.append(time.perf_counter() - start)
    refine = []
    current, clicks = probabilities, []
    for _ in range(args.rounds):
        click = next_click(current > 0.5, truth[12])
        if click is None:  # all fixed: start again from the model's prediction
            current, clicks = probabilities, []
            click = next_click(probabilities > 0.5, truth[12])
        clicks.append(click)
        start = time.perf_counter()
        if with_model:
            current = segmenter.refine(probabilities, clicks=clicks, image=query, prompts=prompts)
        else:
            current = segmenter.refine(current, clicks=[click], image=query)
        refine.append(time.perf_counter() - start)
    ms = np.asarray(refine) * 1000
    print(
        f"{args.size} px query, 4 cached prompts, {args.rounds} rounds"
        f"{' (the model reads the clicks)' if with_model else ''}: "
        f"refine median {np.median(ms):.1f} ms, "
        f"p95 {np.percentile(ms, 95):.1f} ms; cached decode of the query median "
        f"{np.median(decode) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
