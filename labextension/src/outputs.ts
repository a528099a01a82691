// Types only: the cells and outputs are JupyterLab's own, reached through the notebook.
import type { CodeCell, ICodeCellModel } from '@jupyterlab/cells';
import type * as nbformat from '@jupyterlab/nbformat';
import type { NotebookPanel } from '@jupyterlab/notebook';
import type { Kernel, KernelMessage } from '@jupyterlab/services';
import type { IDisposable } from '@lumino/disposable';

import { requestAPI } from './request';

/** One output message a remote kernel published, as the user's server kept it. */
export interface IKeptOutput {
  msg_id: string;
  msg_type: string;
  content: any;
}

/** The latest execution of one cell, with what its kernel published for it. */
export interface IKeptExecution {
  msg_id: string;
  cell_id: string;
  done: boolean;
  execution_count: number | null;
  dropped: number;
  outputs: IKeptOutput[];
}

/** The nbformat output for an iopub message, as JupyterLab's output area makes it. */
export function toOutput(
  msgType: string,
  content: any
): nbformat.IOutput | null {
  switch (msgType) {
    case 'stream':
      return { output_type: 'stream', name: content.name, text: content.text };
    case 'display_data':
      return {
        output_type: 'display_data',
        data: content.data ?? {},
        metadata: content.metadata ?? {}
      };
    case 'execute_result':
      return {
        output_type: 'execute_result',
        data: content.data ?? {},
        metadata: content.metadata ?? {},
        execution_count: content.execution_count ?? null
      };
    case 'error':
      return {
        output_type: 'error',
        ename: content.ename ?? '',
        evalue: content.evalue ?? '',
        traceback: content.traceback ?? []
      };
  }
  return null;
}

/** Cells whose running output a restorer feeds: one restorer each, however many views
 * of the notebook are open (they share its cell models). */
const FED = new WeakSet<ICodeCellModel>();

interface IRoute {
  model: ICodeCellModel;
  widget: CodeCell | null;
  seen: Set<string>;
  clearWait: boolean;
  count: number | null;
}

/**
 * Puts back what a remote kernel printed while this notebook was not open (a refresh, a
 * closed laptop): the user's server keeps each cell's outputs; when the notebook connects
 * to a kernel that already ran cells, their outputs go back in their cells and a cell
 * still running keeps streaming into its cell.
 */
export class OutputRestorer implements IDisposable {
  constructor(panel: NotebookPanel) {
    this._panel = panel;
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  /** Fill the notebook's cells from what the server kept of ``kernel``; how many cells. */
  async attach(kernel: Kernel.IKernelConnection): Promise<number> {
    this._detach();
    const live: KernelMessage.IIOPubMessage[] = [];
    let buffering = true;
    const onIOPub = (
      _: Kernel.IKernelConnection,
      msg: KernelMessage.IIOPubMessage
    ) => {
      if (buffering) {
        live.push(msg);
      } else {
        this._route(msg);
      }
    };
    kernel.iopubMessage.connect(onIOPub);
    this._detach = () => {
      kernel.iopubMessage.disconnect(onIOPub);
      for (const route of this._routes.values()) {
        this._end(route); // no prompt left at [*] by a kernel that went mid-cell
      }
      this._routes.clear();
    };
    let executions: IKeptExecution[] = [];
    try {
      const answer = await requestAPI<{ executions: IKeptExecution[] }>(
        `kernels/${kernel.id}/outputs`
      );
      executions = answer.executions ?? [];
    } catch {
      // not a remote kernel of this server, or gone: nothing to put back
    }
    let restored = 0;
    for (const execution of executions) {
      if (this._restore(execution)) {
        restored++;
      }
    }
    buffering = false;
    for (const msg of live) {
      this._route(msg);
    }
    return restored;
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    this._detach();
  }

  private _restore(execution: IKeptExecution): boolean {
    const notebook = this._panel.content;
    const model = notebook.model?.cells
      ? Array.from(notebook.model.cells).find(
          cell => cell.id === execution.cell_id && cell.type === 'code'
        )
      : undefined;
    if (!model || FED.has(model as ICodeCellModel)) {
      return false; // another view of this notebook has it
    }
    const widget =
      (notebook.widgets.find(cell => cell.model.id === execution.cell_id) as
        CodeCell | undefined) ?? null;
    const route: IRoute = {
      model: model as ICodeCellModel,
      widget,
      seen: new Set(execution.outputs.map(output => output.msg_id)),
      clearWait: false,
      count: execution.execution_count
    };
    // The cell shows what the notebook was saved with; the server kept what came since.
    route.model.outputs.clear();
    if (execution.dropped) {
      route.model.outputs.add({
        output_type: 'stream',
        name: 'stderr',
        text: `[gpu-share: the first ${execution.dropped} output(s) of this run were not kept]\n`
      });
    }
    for (const output of execution.outputs) {
      this._apply(route, output.msg_type, output.content);
    }
    if (execution.done) {
      route.model.executionCount = execution.execution_count;
    } else {
      widget?.setPrompt('*');
      FED.add(route.model);
      this._routes.set(execution.msg_id, route);
    }
    return true;
  }

  private _route(msg: KernelMessage.IIOPubMessage): void {
    const parent = (msg.parent_header as any)?.msg_id as string | undefined;
    const route = parent ? this._routes.get(parent) : undefined;
    if (!route || route.seen.has(msg.header.msg_id)) {
      return;
    }
    const type = msg.header.msg_type;
    const content = msg.content as any;
    if (type === 'status') {
      if (content.execution_state === 'idle') {
        this._routes.delete(parent!);
        this._end(route);
      }
      return;
    }
    if (type === 'execute_input') {
      route.count = content.execution_count ?? route.count;
      return;
    }
    this._apply(route, type, content);
  }

  private _end(route: IRoute): void {
    FED.delete(route.model);
    route.model.executionCount = route.count;
  }

  private _apply(route: IRoute, type: string, content: any): void {
    if (type === 'clear_output') {
      if (content.wait) {
        route.clearWait = true;
      } else {
        route.model.outputs.clear();
      }
      return;
    }
    const output = toOutput(type, content);
    if (!output) {
      return;
    }
    if (route.clearWait) {
      route.model.outputs.clear();
      route.clearWait = false;
    }
    if (type === 'execute_result') {
      route.count = content.execution_count ?? route.count;
    }
    route.model.outputs.add(output);
  }

  private _panel: NotebookPanel;
  private _routes = new Map<string, IRoute>();
  private _detach: () => void = () => undefined;
  private _isDisposed = false;
}
