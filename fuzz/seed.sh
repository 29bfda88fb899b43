#!/bin/sh
# Seed both fuzz targets' corpora from the example configs (the corpus
# directories are not committed: see ../.gitignore).
set -eu
cd "$(dirname "$0")"
for target in parse_validate fmt_roundtrip; do
    mkdir -p "corpus/$target"
    for f in ../examples/*.conf seeds/*.conf; do
        [ -f "$f" ] && cp "$f" "corpus/$target/$(basename "$f")"
    done
done
echo "seeded: $(ls corpus/parse_validate | wc -l) files per target"
