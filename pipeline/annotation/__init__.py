"""The annotation library, in the order a unit goes through it.

    measurements  zone → connected regions (boxes in original pixels) → model-free measurements
    renderings    regions → images for the model (overlay, crop, or the whole image) — Rendering
    prompts       versioned prompts and the request (instruction first, then the images)
    llm           the request/result types and the Backend protocol; llm_openai and
                  llm_transformers are the two backends
    answers       the tolerant parser of what comes back; vocabulary normalises body parts
    record        Annotation, one traits/ row
    describer     TraitDescriber (render → prompt → backend → parse → Annotation) and
                  RemoteDescriber (the same, answered by the Serve app's deployment)
    stage         the annotate stage: candidates/ → units → AnnotateUnits → traits/

Library code: it imports only pipeline's other modules, never actors/."""
