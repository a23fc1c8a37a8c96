//! Checking an upload without compiling it: the bytes are valid Wasm, of a
//! kind a task may be, exporting what a task must export and importing only
//! what the sandbox provides. Milliseconds where a compile takes seconds
//! (a componentize-py module is about 19 MB), so an upload is answered
//! after this and the compile runs in the background (see
//! `dispatch::registry`). The compile still checks everything again; this
//! only gives an uploader the common refusals at once, in the same words.

use super::error::TaskError;
use crate::model::ModuleKind;
use wasmparser::{Parser, Payload, Validator};

/// Why a core module without `_start` is refused (here and by the compile).
pub(super) const NO_START: &str =
    "core module has no _start function: only WASI preview-1 commands are accepted";
/// Why bytes that are neither a module nor a component are refused.
pub(super) const NOT_WASM: &str = "not a WebAssembly module or component (bad magic or version)";

/// The interface a component must export.
const TASK_EXPORT: &str = "kwq:task/task@";
/// Import namespaces a component may use: WASI (refused where it reaches
/// outside the sandbox) and the host's context.
const COMPONENT_IMPORTS: &[&str] = &["wasi:", "kwq:task/context@", "kwq:task/inputs@"];
/// The one module a WASI command may import from.
const COMMAND_IMPORTS: &[&str] = &["wasi_snapshot_preview1", "wasi_unstable"];

/// The kind of task module `bytes` are, or why they are not one.
pub(super) fn validate(bytes: &[u8]) -> Result<ModuleKind, TaskError> {
    let invalid = |what: &str, e: wasmparser::BinaryReaderError| {
        TaskError::InvalidModule(format!("{what}: {e}"))
    };
    if Parser::is_component(bytes) {
        Validator::new()
            .validate_all(bytes)
            .map_err(|e| invalid("not a valid component", e))?;
        let (imports, exports) = top_level_names(bytes, true);
        if let Some(name) = imports
            .iter()
            .find(|n| !COMPONENT_IMPORTS.iter().any(|p| n.starts_with(p)))
        {
            return Err(TaskError::InvalidModule(format!(
                "component imports something a task may not have: {name}"
            )));
        }
        if !exports.iter().any(|n| n.starts_with(TASK_EXPORT)) {
            return Err(TaskError::InvalidModule(
                "component does not export kwq:task/task".into(),
            ));
        }
        Ok(ModuleKind::Component)
    } else if Parser::is_core_wasm(bytes) {
        Validator::new()
            .validate_all(bytes)
            .map_err(|e| invalid("not a valid module", e))?;
        let (imports, exports) = top_level_names(bytes, false);
        if !exports.iter().any(|n| n == "_start") {
            return Err(TaskError::InvalidModule(NO_START.into()));
        }
        if let Some(name) = imports.iter().find(|n| {
            !COMMAND_IMPORTS
                .iter()
                .any(|m| n.split("::").next() == Some(m))
        }) {
            return Err(TaskError::InvalidModule(format!(
                "module imports something other than WASI preview 1: {name}"
            )));
        }
        Ok(ModuleKind::WasiCommand)
    } else {
        Err(TaskError::InvalidModule(NOT_WASM.into()))
    }
}

/// Names the outermost component (or module) imports and exports; nested
/// modules and components are skipped. Core imports read `module::name`.
/// Only called on validated bytes, so a parse error cannot happen here;
/// one would end the listing early and the compile would report it.
fn top_level_names(bytes: &[u8], component: bool) -> (Vec<String>, Vec<String>) {
    let (mut imports, mut exports) = (Vec::new(), Vec::new());
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { break };
        match payload {
            Payload::Version { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(section) if depth == 1 && component => {
                imports.extend(section.into_iter().flatten().map(|i| i.name.0.to_string()));
            }
            Payload::ComponentExportSection(section) if depth == 1 && component => {
                exports.extend(section.into_iter().flatten().map(|e| e.name.0.to_string()));
            }
            Payload::ImportSection(section) if depth == 1 && !component => {
                imports.extend(
                    section
                        .into_iter()
                        .flatten()
                        .map(|i| format!("{}::{}", i.module, i.name)),
                );
            }
            Payload::ExportSection(section) if depth == 1 && !component => {
                exports.extend(
                    section
                        .into_iter()
                        .flatten()
                        .filter(|e| e.kind == wasmparser::ExternalKind::Func)
                        .map(|e| e.name.to_string()),
                );
            }
            _ => {}
        }
    }
    (imports, exports)
}
