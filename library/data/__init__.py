"""The training data: image folders and sd-scripts' dataset TOML (`dataset_config`), images (`images`), captions
(`captions`), aspect buckets (`buckets`), the dataset and batch sampler (`dataset`), and the latent and
text-encoder caches (`latent_cache`, `text_encoder_cache`, in sd-scripts' .npz format). May import
`library.errors`, `library.sdscripts_options` and `library.files`; never `model`, `train` or `config` (the
encoders a cache needs are passed in as functions)."""
