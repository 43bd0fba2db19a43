//! publish: pushes every image of a bundle, byte for byte, into the target registry
