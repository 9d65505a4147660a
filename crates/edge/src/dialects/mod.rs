//! The dialects a node serves, built from its configuration, and the render
//! slots they use.

pub mod seed000;
pub mod seed001;
pub mod seed002;
pub mod seed003;
pub mod seed004;

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::dialect::Dialect;
use crate::session::MAX_RENDER_SLOTS;

/// Hands out render slots: one per renderer on the node, so the hub can
/// keep one rendered frame per slot per fan-out.
#[derive(Debug, Default)]
pub struct Slots {
    next: usize,
}

impl Slots {
    /// The next free slot.
    ///
    /// # Panics
    /// When more than [`MAX_RENDER_SLOTS`] renderers are built: a build-time
    /// limit of the node, not an input error.
    pub fn allocate(&mut self) -> usize {
        let slot = self.next;
        assert!(
            slot < MAX_RENDER_SLOTS,
            "more renderers than MAX_RENDER_SLOTS"
        );
        self.next += 1;
        slot
    }
}

/// Every enabled dialect.
pub(crate) fn build(config: &Config) -> Result<Vec<Arc<dyn Dialect>>, ConfigError> {
    let mut slots = Slots::default();
    let mut dialects: Vec<Arc<dyn Dialect>> = Vec::new();
    let d = &config.dialects;
    if d.native.enabled {
        dialects.push(Arc::new(crate::native::NativeDialect::new(
            &d.native, &mut slots,
        )));
    }
    if d.seed000.enabled {
        dialects.push(Arc::new(seed000::Seed000::new(config, &mut slots)?));
    }
    if d.seed001.enabled {
        dialects.push(Arc::new(seed001::Seed001::new(config, &mut slots)?));
    }
    if d.seed002.enabled {
        dialects.push(Arc::new(seed002::Seed002::new(config, &mut slots)?));
    }
    if d.seed003.enabled {
        dialects.push(Arc::new(seed003::Seed003::new(
            &d.seed003, config, &mut slots,
        )?));
    }
    if d.seed004.enabled {
        dialects.push(Arc::new(seed004::Seed004::new(config, &mut slots)?));
    }
    Ok(dialects)
}
