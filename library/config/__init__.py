"""The entry layer: sd-scripts' flags (`cli`), `--config_file` TOML (`config_file`), and the one place where the
argparse namespace becomes typed, frozen, validated configuration (`build`: one builder per slice, then the checks
across slices in `checks`). Only this wing reads the namespace; every other wing receives the dataclass slice it
needs. It may import every other wing (their config slices and their cheap checks run here, before any model
loads)."""
