"""What Ray instantiates: the encoder actors (encoder), the annotate actor (annotate) and the
annotator Serve application's deployments (serve_app). Each is a thin host around library code:
actors import pipeline's library; pipeline's library never imports actors — only the driver entry
points (pipeline.build, pipeline.train_sae) name actor classes."""
