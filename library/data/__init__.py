"""The training data: image folders and sd-scripts' dataset TOML (`dataset_config`), images (`images`), captions
(`captions`), aspect buckets (`buckets`), the dataset and batch sampler (`dataset`), the latent and text-encoder
caches (`latent_cache`, `text_encoder_cache`, in sd-scripts' .npz format) and how several processes share one
caching pass (`process_share`). May import `library.errors`, `library.sdscripts_options` and `library.files`; never
`model`, `train` or `config` (the encoders a cache needs, and the collective, are passed in as functions)."""
