"""The pages of the web UI, one module each: build(ctx) lays it out and wires its events."""

# For events that show no progress (timers, pickers' refreshes, the form's check, Start): no progress target.
# Gradio's page keeps a loading status for every component that was ever an event's progress target and, on
# every later event, updates each of them, searching its whole component tree for each (the Tabs holding the
# form: every field under it). Without targets an event costs the browser a fraction of that, which is what
# keeps Start's refusal quick on a loaded machine and leaves an open picker alone while timers tick.
QUIET = {"show_progress": "hidden", "show_progress_on": []}
