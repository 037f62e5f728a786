"""Pure model code: torch and numpy, no database, network or task queue; imports nothing from the other packages.

Modules, in the order data flows through them:

- ``labels``        Prima's 52 diagnosis names, priority classes, our default referral list
- ``dicom_frames``  one header per image, single-frame and enhanced multi-frame alike; pixel decoding
- ``dicom_native``  uncompressed single-frame files read from their bytes (pydicom's values, 5x GDCM's speed)
- ``resample``      in-plane resampling to 256 x 256 with SimpleITK's linear semantics
- ``orientation``   permute/flip to [S][P][L] array axes
- ``volume``        series -> :class:`~models.volume.SeriesVolume` (``load_series``, ``load_study``)
- ``positional``    fixed sinusoidal position features
- ``tokenizer``     volume -> patch tokens with background filtered before the VQ-VAE
- ``vqvae``         the VQ-VAE (MONAI), ``full`` and ``tiny``
- ``transformer``   attention/MLP blocks and the register ViT
- ``text_encoder``  character-level series-name / study-description encoder
- ``heads``         stacked diagnosis/referral MLP heads, priority head
- ``prima``         hierarchical ViT + heads, configs, reference checkpoint adaptation
- ``bundle``        model bundles (manifest + checksummed state dicts)
- ``inference``     :class:`~models.inference.StudyPredictor`, the worker's entry point
- ``regions``       token -> source-image pixel polygons for explanations
"""
