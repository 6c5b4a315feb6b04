//! Redis hot store.
