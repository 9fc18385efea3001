"""sae-traits: the library and the drivers.

The library — contract (every table's schema and the one table of stages), config, storage,
sources, preprocessing, encoding and sae, counting, selection, boxes, candidates, the annotation
package (render → prompt → LLM client → parse → Annotation → the annotate stage), errors,
execution (the Ray wiring both drivers share), endpoint (the ad-hoc endpoint's request handling)
— imports only itself and third-party packages, never ``actors``. The drivers — build, train_sae
(and demo, report, cluster_check, which run them or read what they wrote) — are the entry points;
build and train_sae are the only modules of this package that name actor classes (``actors`` is
what Ray instantiates, thin hosts around this library). Every import is at module level."""
