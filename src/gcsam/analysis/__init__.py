"""The analysis layer: how flat is a trained model. :mod:`~gcsam.analysis.sharpness` (Hessian
spectrum and trace, SAM sharpness), :mod:`~gcsam.analysis.landscape` (loss landscapes) and
:mod:`~gcsam.analysis.plotting` (their figures, with matplotlib). It uses the optimizer layer
only for ``frozen_bn_stats``; the toolkit builds on it."""
