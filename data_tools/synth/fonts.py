"""TrueType fonts for synthetic images: the Debian font packages, else matplotlib's DejaVu.

The set-up (``make system-deps``) installs ``fonts-dejavu-core fonts-liberation
fonts-freefont-ttf``. When none of them is present we fall back to the DejaVu fonts that ship
inside matplotlib and say so once in the log, so generation still works (with less variety).
The font list is sorted, so a seed picks the same font on any machine with the same fonts.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from PIL import ImageFont

log = logging.getLogger(__name__)

# (family name as matplotlib knows it, style, file name) for the Debian packages.
_DEBIAN_DIRS = (
    "/usr/share/fonts/truetype/dejavu",
    "/usr/share/fonts/truetype/liberation",
    "/usr/share/fonts/truetype/freefont",
)
_WANTED = {
    # style -> file names, in preference order; missing files are skipped
    "sans": [
        "DejaVuSans.ttf",
        "LiberationSans-Regular.ttf",
        "FreeSans.ttf",
        "LiberationSansNarrow-Regular.ttf",
    ],
    "sans_bold": ["DejaVuSans-Bold.ttf", "LiberationSans-Bold.ttf", "FreeSansBold.ttf"],
    "serif": ["DejaVuSerif.ttf", "LiberationSerif-Regular.ttf", "FreeSerif.ttf"],
    "serif_bold": ["DejaVuSerif-Bold.ttf", "LiberationSerif-Bold.ttf", "FreeSerifBold.ttf"],
    "mono": ["DejaVuSansMono.ttf", "LiberationMono-Regular.ttf", "FreeMono.ttf"],
    "mono_bold": ["DejaVuSansMono-Bold.ttf", "LiberationMono-Bold.ttf", "FreeMonoBold.ttf"],
}
_MPL_FALLBACK = {
    "sans": "DejaVuSans.ttf",
    "sans_bold": "DejaVuSans-Bold.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif_bold": "DejaVuSerif-Bold.ttf",
    "mono": "DejaVuSansMono.ttf",
    "mono_bold": "DejaVuSansMono-Bold.ttf",
}


@functools.cache
def font_files() -> dict[str, tuple[str, ...]]:
    """Font file paths by style (sans, sans_bold, serif, serif_bold, mono, mono_bold)."""
    found: dict[str, tuple[str, ...]] = {}
    for style, names in _WANTED.items():
        paths = [str(Path(d) / n) for n in names for d in _DEBIAN_DIRS if (Path(d) / n).is_file()]
        found[style] = tuple(paths)
    if not any(found.values()):
        import matplotlib

        mpl_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        log.warning(
            "synth: no Debian fonts found in %s; using matplotlib's bundled DejaVu fonts. "
            "Install fonts-dejavu-core fonts-liberation fonts-freefont-ttf (make system-deps) for variety.",
            ", ".join(_DEBIAN_DIRS),
        )
        found = {style: (str(mpl_dir / name),) for style, name in _MPL_FALLBACK.items()}
    else:  # a style with no Debian file borrows the first file of its base style
        for style in found:
            if not found[style]:
                base = style.split("_")[0]
                found[style] = found.get(base) or next(v for v in found.values() if v)
    return found


@functools.lru_cache(maxsize=512)
def truetype(path: str, size: int) -> ImageFont.FreeTypeFont:
    """A cached PIL font (loading a TTF costs ~1 ms; documents use dozens of text runs)."""
    return ImageFont.truetype(path, size)


def pick(rng, style: str) -> str:
    """One font path of ``style`` chosen by ``rng`` (a numpy Generator)."""
    files = font_files()[style]
    return files[int(rng.integers(len(files)))]


@functools.cache
def matplotlib_families() -> tuple[str, ...]:
    """Family names registered with matplotlib for every regular font we found (sorted)."""
    from matplotlib import font_manager

    names = set()
    for style in ("sans", "serif", "mono"):
        for path in font_files()[style]:
            font_manager.fontManager.addfont(path)
            names.add(font_manager.FontProperties(fname=path).get_name())
    return tuple(sorted(names))
