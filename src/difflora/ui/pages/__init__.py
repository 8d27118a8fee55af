"""The pages of the web UI, one module each: build(ctx) lays it out and wires its events."""
