"""`difflora ui`: a local web app (Gradio) over the CLI.

The rest of difflora never imports this package. Training, evaluation and the LoRA tools run
as `python -m difflora ...` subprocesses, so the server only reads what they write (events,
logs, images) and a crash in training never takes the server down.
"""
