"""The demo's room, away from the stages it feeds: synthetic specimen photos with planted parts
(:mod:`.specimens`), synthetic firings at realistic density for scale runs (:mod:`.firings`),
tiny random-weight models loaded through the real loaders (:mod:`.tiny_models`), and the offline
demo build itself (:mod:`.run`; ``python -m pipeline.demo`` / ``sae-traits demo``)."""
