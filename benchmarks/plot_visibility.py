"""Draw docs/images/visibility.png: the keys each query row sees under a knockout table, a sliding window and an
image block, computed by the float64 oracle :func:`flowkern.reference.visible_mask` on a 16-token prompt
(system 0-1, image 2-9, user 10-13, generated 14-15).

    python benchmarks/plot_visibility.py [--out docs/images/visibility.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from flowkern import reference  # noqa: E402

NAMES = ["system", "image", "user", "generated"]
SEGMENTS = torch.tensor([[0] * 2 + [1] * 8 + [2] * 4 + [3] * 2])
COLOURS = ["#9e9e9e", "#4c9be8", "#f2a541", "#6abf69"]


def panels() -> list[tuple[str, torch.Tensor]]:
    s = SEGMENTS.shape[1]
    allowed = torch.ones(4, 4, dtype=torch.bool)
    allowed[2, 1] = allowed[3, 1] = False  # user and generated rows do not see the image
    groups = torch.where(SEGMENTS == 1, 1, 0)
    common = dict(causal=True, key_padding_mask=None, device=torch.device("cpu"))
    return [
        ("knockout: allowed[user, image] =\nallowed[generated, image] = False",
         reference.visible_mask(s, s, segment_ids=SEGMENTS, allowed=allowed, **common)[0, 0]),
        ("window = 4", reference.visible_mask(s, s, window=4, **common)[0, 0]),
        ("image block: group_ids = 1 on the image\n(bidirectional inside it)",
         reference.visible_mask(s, s, group_ids=groups, **common)[0, 0]),
    ]


def draw(out: Path) -> None:
    s = SEGMENTS.shape[1]
    seg = SEGMENTS[0]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), constrained_layout=True)
    for ax, (title, vis) in zip(axes, panels(), strict=True):
        # colour a visible cell by the key's segment, hidden cells white
        img = torch.where(vis, seg[None, :] + 1, 0)
        ax.imshow(img.numpy(), cmap=ListedColormap(["white", *COLOURS]), vmin=0, vmax=4, interpolation="nearest")
        ax.set_xticks(range(s))
        ax.set_yticks(range(s))
        ax.set_xticklabels([str(j) for j in range(s)], fontsize=6)
        ax.set_yticklabels([str(i) for i in range(s)], fontsize=6)
        ax.set_xticks([x - 0.5 for x in range(1, s)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, s)], minor=True)
        ax.grid(which="minor", color="#dddddd", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
        ax.set_xlabel("key j")
        ax.set_ylabel("query row i")
        ax.set_title(title, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS]
    fig.legend(handles, [f"visible key in {n}" for n in NAMES], loc="lower center", ncol=4, frameon=False,
               bbox_to_anchor=(0.5, -0.06))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs/images/visibility.png")
    draw(ap.parse_args().out)


if __name__ == "__main__":
    main()
