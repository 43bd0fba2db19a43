//! ingest: takes bundles in over HTTP and from a drop directory, stores them once, checksummed
