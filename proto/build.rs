//! Compiles `shipperd/v1/*.proto` without protoc: protox parses, prost generates.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["shipperd/v1/events.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        // Webhooks carry event data as JSON: the same field names, camelCase.
        .type_attribute(
            ".",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"camelCase\", default)]",
        )
        .compile_fds(fds)?;
    Ok(())
}
