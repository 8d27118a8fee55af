"""Dataset preparation: crop, pair alignment, tagging, caption editing (`difflora prep ...`).

    files.py      images, pairs and caption files of a folder
    saliency.py   the subject map used by focus crop (numpy only)
    crop.py       crop boxes (center / focus / none), one box per pair, kohya's no-upscale rule
    taggers.py    WD14-style ONNX taggers, transformers captioners, the toy world's judge
    captions.py   trigger word, remove / replace / dedupe / sort tags, frequency and pair reports

Pair alignment (shift / scale / rotation, changed area, registration) is data/alignment.py: training
checks every pair with it too.
"""
