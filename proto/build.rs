//! Compiles `shipperd/v1/*.proto` without protoc: protox parses, prost generates.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["shipperd/v1/events.proto", "shipperd/v1/bundles.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        // The gRPC API: its server (ingest) and client (the CLI), over any transport.
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        // Webhooks carry event data as JSON: the same field names, camelCase.
        .message_attribute(
            ".",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"camelCase\", default)]",
        )
        .enum_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .compile_fds(fds)?;
    Ok(())
}
