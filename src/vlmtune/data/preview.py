"""`vlmtune data preview`: a PNG grid of training samples and augmented draws of them, with their text."""

from __future__ import annotations

import textwrap
from pathlib import Path

from vlmtune.config.schema import Config
from vlmtune.data.augment import Augmenter
from vlmtune.data.collate import load_images
from vlmtune.data.sharegpt import Sample
from vlmtune.data.sources import iter_split


def preview(cfg: Config, out: str | Path, samples: int = 4, views: int = 4) -> Path:
    """Writes a grid: one row per sample with images (its first image, then ``views`` augmented draws at
    epochs 0, 1, ...; each titled with what was done), and the sample's conversation beside it.

    The draws are the ones training makes for the sample at that index and epoch when the first samples
    of ``data.train`` are all kept.

    Raises:
        ValueError: ``data.train`` has no readable sample with an image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked: list[tuple[int, Sample]] = []
    index = 0
    for got in iter_split(cfg.data.train, cfg.data, "train"):
        if isinstance(got, Sample):
            if got.images:
                picked.append((index, got))
                if len(picked) == samples:
                    break
            index += 1
    if not picked:
        raise ValueError(f"data.train ({cfg.data.train}) has no readable sample with an image to preview")
    augment = Augmenter(cfg.data.augment)
    cols = views + 1
    fig, axes = plt.subplots(
        len(picked),
        cols + 1,
        figsize=(2.2 * cols + 4.4, 2.6 * len(picked)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1] * cols + [2]},
    )
    for row, (i, sample) in enumerate(picked):
        image = load_images(sample)[0]
        axes[row][0].imshow(image)
        axes[row][0].set_title(f"sample {i}: original", fontsize=7)
        for epoch in range(views):
            params = augment.params((image.height, image.width), i, epoch)
            axes[row][epoch + 1].imshow(augment(image, i, epoch))
            axes[row][epoch + 1].set_title(f"epoch {epoch}\n{params.describe((image.height, image.width))}", fontsize=6)
        more = f" (first of {len(sample.images)} images)" if len(sample.images) > 1 else ""
        text = "\n".join(textwrap.shorten(f"{role}: {content}", 160) for role, content in sample.messages)
        wrapped = "\n".join(textwrap.fill(line, 48) for line in f"{sample.where}{more}\n{text}".splitlines())
        axes[row][cols].text(0, 1, wrapped, va="top", ha="left", fontsize=7, family="monospace")
        for ax in axes[row]:
            ax.axis("off")
    state = "on" if cfg.data.augment.enabled else "OFF (data.augment.enabled: false; shown as it would be)"
    fig.suptitle(
        f"training augmentation {state}, seed {cfg.data.augment.seed}; eval data is never augmented", fontsize=9
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
