"""mkdocs hook: publish the benchmark plots where they live (benchmarks/results/<machine>/*.png)
as site files benchmarks/<machine>/*.png, without copying them into docs/."""

from __future__ import annotations

import glob
import os

from mkdocs.structure.files import File


def on_files(files, config):
    root = os.path.dirname(config["config_file_path"])
    for path in sorted(glob.glob(os.path.join(root, "benchmarks", "results", "*", "*.png"))):
        machine = os.path.basename(os.path.dirname(path))
        files.append(File.generated(config, f"benchmarks/{machine}/{os.path.basename(path)}",
                                    abs_src_path=path))
    return files
