//! Configuration: the types and their defaults (`types`), the layers that
//! set them — file, environment, flags — with where each value came from
//! (`load`), the bounds every value must keep (`validate`), the effective
//! configuration as TOML (`render`), and where files live (`paths`).

mod load;
pub mod paths;
mod render;
mod suggest;
mod types;
mod validate;

pub use load::{
    ConfigError, ENV_KEYS, Layers, Loaded, Override, Source, line_of, load, process_env,
};
pub use render::render;
pub use suggest::nearest;
pub use types::*;
pub use validate::{MAX_SECONDS, validate};
