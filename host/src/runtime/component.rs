//! Components built on `wit/kwq-task.wit` (0.2.0) or its first version
//! (`wit/v0.1.0`): generated bindings for both, the host side of
//! `kwq:task/context` and `kwq:task/inputs`, and instantiation.

use super::guest::{GuestContext, HasGuest};
use crate::model::LogLevel;
use wasmtime::component::{HasSelf, InstancePre, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::http_refused::RefuseOutgoing;

/// The current contract, `kwq:task@0.2.0` (`wit/kwq-task.wit`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
mod bindings {
    wasmtime::component::bindgen!({
        world: "kwq-task",
        path: "../wit",
        imports: { "kwq:task/inputs.next-results": async | trappable },
        exports: { default: async },
    });
}

/// The first contract, `kwq:task@0.1.0` (`wit/v0.1.0`): modules built
/// against it still run; they have no `inputs`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
mod bindings_v1 {
    wasmtime::component::bindgen!({
        world: "kwq-task",
        path: "../wit/v0.1.0",
        exports: { default: async },
    });
}

use bindings::kwq::task::context::Level;
use bindings::kwq::task::inputs::JobResult;

/// A component's pre-instantiated exports, for the contract version it
/// was built against (its `kwq:task/task` export names it).
pub(super) enum TaskPre {
    /// `kwq:task@0.2.0`.
    V2(bindings::KwqTaskPre<ComponentState>),
    /// `kwq:task@0.1.0`.
    V1(bindings_v1::KwqTaskPre<ComponentState>),
}

/// An instance's `kwq:task/task` export, of either version.
pub(super) enum TaskBindings {
    V2(bindings::KwqTask),
    V1(bindings_v1::KwqTask),
}

impl TaskPre {
    /// Find the task export: 0.2.0 first, else 0.1.0 (the error named is
    /// the current version's).
    pub(super) fn new(pre: InstancePre<ComponentState>) -> wasmtime::Result<Self> {
        match bindings::KwqTaskPre::new(pre.clone()) {
            Ok(v2) => Ok(TaskPre::V2(v2)),
            Err(error) => bindings_v1::KwqTaskPre::new(pre)
                .map(TaskPre::V1)
                .map_err(|_| error),
        }
    }

    pub(super) async fn instantiate_async(
        &self,
        store: &mut Store<ComponentState>,
    ) -> wasmtime::Result<TaskBindings> {
        Ok(match self {
            TaskPre::V2(pre) => TaskBindings::V2(pre.instantiate_async(store).await?),
            TaskPre::V1(pre) => TaskBindings::V1(pre.instantiate_async(store).await?),
        })
    }
}

impl TaskBindings {
    pub(super) async fn call_init(
        &self,
        store: &mut Store<ComponentState>,
        config: &[u8],
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            TaskBindings::V2(b) => b.kwq_task_task().call_init(store, config).await,
            TaskBindings::V1(b) => b.kwq_task_task().call_init(store, config).await,
        }
    }

    pub(super) async fn call_run(
        &self,
        store: &mut Store<ComponentState>,
        payload: &[u8],
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        match self {
            TaskBindings::V2(b) => b.kwq_task_task().call_run(store, payload).await,
            TaskBindings::V1(b) => b.kwq_task_task().call_run(store, payload).await,
        }
    }
}

/// Store data of a component instance.
pub(super) struct ComponentState {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    refuse_outgoing: RefuseOutgoing,
    guest: GuestContext,
}

impl ComponentState {
    pub(super) fn new(guest: GuestContext) -> Self {
        let wasi = guest.sandbox().build();
        ComponentState {
            wasi,
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            refuse_outgoing: RefuseOutgoing,
            guest,
        }
    }
}

impl HasGuest for ComponentState {
    fn guest(&self) -> &GuestContext {
        &self.guest
    }
    fn guest_mut(&mut self) -> &mut GuestContext {
        &mut self.guest
    }
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for ComponentState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.refuse_outgoing,
        }
    }
}

impl bindings::kwq::task::context::Host for ComponentState {
    fn log(&mut self, level: Level, message: String) {
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        self.guest.log(level, message);
    }

    fn progress(&mut self, fraction: f32) {
        self.guest.set_progress(fraction);
    }

    fn task_id(&mut self) -> String {
        self.guest.task_id.clone()
    }

    fn attempt(&mut self) -> u32 {
        self.guest.attempt
    }
}

/// 0.1.0's context is 0.2.0's: same functions, its own generated types.
impl bindings_v1::kwq::task::context::Host for ComponentState {
    fn log(&mut self, level: bindings_v1::kwq::task::context::Level, message: String) {
        use bindings_v1::kwq::task::context::Level as V1;
        let level = match level {
            V1::Trace => Level::Trace,
            V1::Debug => Level::Debug,
            V1::Info => Level::Info,
            V1::Warn => Level::Warn,
            V1::Error => Level::Error,
        };
        bindings::kwq::task::context::Host::log(self, level, message);
    }

    fn progress(&mut self, fraction: f32) {
        self.guest.set_progress(fraction);
    }

    fn task_id(&mut self) -> String {
        self.guest.task_id.clone()
    }

    fn attempt(&mut self) -> u32 {
        self.guest.attempt
    }
}

impl bindings::kwq::task::inputs::Host for ComponentState {
    /// A page of the fan-in task's input; empty for a task without one. A
    /// store that cannot be read fails the attempt (a trap), rather than
    /// letting the guest take a short input for the whole.
    async fn next_results(&mut self, max: u32) -> wasmtime::Result<Vec<JobResult>> {
        let Some(cursor) = self.guest.input.as_mut() else {
            return Ok(Vec::new());
        };
        let page = cursor
            .next(max as usize)
            .await
            .map_err(|why| wasmtime::Error::msg(format!("input cut short: {why}")))?;
        Ok(page
            .into_iter()
            .map(|entry| JobResult {
                task_id: entry.task_id,
                output: entry.result,
            })
            .collect())
    }
}

/// The linker every component is instantiated with: WASI preview 2 (its
/// sandbox is set per store), `wasi:http` that refuses every request (see
/// `http_refused`), plus `kwq:task/context` and `kwq:task/inputs` (0.2.0)
/// and 0.1.0's `kwq:task/context`.
pub(super) fn linker(engine: &Engine) -> wasmtime::Result<Linker<ComponentState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    bindings::KwqTask::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    bindings_v1::kwq::task::context::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    Ok(linker)
}

/// A fresh store for a component instance.
pub(super) fn store(engine: &Engine, guest: GuestContext) -> Store<ComponentState> {
    Store::new(engine, ComponentState::new(guest))
}
