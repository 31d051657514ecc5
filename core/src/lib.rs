//! placeholder, being written
#![allow(missing_docs)]
pub mod env;
pub mod ids;
pub use ids::{DeviceId, Epoch, IdParseError, Locator, StoreId};
