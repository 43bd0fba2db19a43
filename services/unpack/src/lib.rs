//! unpack: opens stored bundles, checks them and lists their images
