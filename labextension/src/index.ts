import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { ILauncher } from '@jupyterlab/launcher';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';

import { ClassesModel } from './classesModel';
import { ClassesPanel } from './classesPanel';
import { classIcon, gpuIcon } from './icons';
import { DEFAULT_SETTINGS, GPUShareModel } from './model';
import { INotebookGPUs, NotebookGPUs } from './notebook';
import { creditsToMicro } from './money';
import { launcherLabel } from './offers';
import { MarketplacePanel } from './panel';
import { requestAPI } from './request';
import { GPUMeter } from './statusbar';
import {
  GPUShare,
  IGPUShareClasses,
  IGPUShareModel,
  KERNEL_NAME
} from './tokens';

const CORE_PLUGIN = 'jupyter-gpu-share:plugin';

/** The core: one model polling offers, account and sessions, configured by the settings. */
const core: JupyterFrontEndPlugin<IGPUShareModel> = {
  id: CORE_PLUGIN,
  description:
    'Polls the shared-GPU marketplace and your sessions through this Jupyter server.',
  autoStart: true,
  provides: IGPUShareModel,
  optional: [ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    registry: ISettingRegistry | null
  ): IGPUShareModel => {
    const model = new GPUShareModel(app.serviceManager.serverSettings);
    model.start();
    if (registry) {
      registry
        .load(CORE_PLUGIN)
        .then(settings => {
          const apply = () => {
            model.settings = {
              ...DEFAULT_SETTINGS,
              ...(settings.composite as Partial<GPUShare.ISettings>)
            };
          };
          // The caps are the broker's (it stops kernels at them for every client, the
          // CLI's `caps` too): a cap changed here is written there, and only that one
          // (what the CLI set otherwise stays).
          const writeCaps = (before: GPUShare.ISettings) => {
            const cap = (credits: number) =>
              credits > 0 ? creditsToMicro(credits) : null;
            const changed: Record<string, number | null> = {};
            if (before.sessionCapCredits !== model.settings.sessionCapCredits) {
              changed.session_cap_micro = cap(model.settings.sessionCapCredits);
            }
            if (before.dailyCapCredits !== model.settings.dailyCapCredits) {
              changed.day_cap_micro = cap(model.settings.dailyCapCredits);
            }
            if (Object.keys(changed).length === 0) {
              return;
            }
            void requestAPI(
              'me/caps',
              { method: 'PUT', body: JSON.stringify(changed) },
              app.serviceManager.serverSettings
            ).catch(reason =>
              Notification.error(
                `Your spending caps were not saved at the broker: ${
                  reason instanceof Error ? reason.message : String(reason)
                }`
              )
            );
          };
          settings.changed.connect(() => {
            const before = model.settings;
            apply();
            writeCaps(before);
          });
          apply();
        })
        .catch(reason =>
          console.error('gpu-share: cannot load settings', reason)
        );
    }
    return model;
  }
};

/** Start-up progress, end banners and spending caps on each notebook. */
const notebooks: JupyterFrontEndPlugin<INotebookGPUs> = {
  id: 'jupyter-gpu-share:notebook',
  description:
    'Shows a remote kernel’s start-up and end on its notebook; enforces spending caps.',
  autoStart: true,
  provides: INotebookGPUs,
  requires: [IGPUShareModel, INotebookTracker],
  optional: [ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    model: IGPUShareModel,
    tracker: INotebookTracker,
    palette: ICommandPalette | null
  ): INotebookGPUs => {
    const gpus = new NotebookGPUs(model);
    tracker.forEach(panel => gpus.add(panel));
    tracker.widgetAdded.connect((_, panel) => gpus.add(panel));
    const bringBack = 'gpu-share:bring-back-files';
    app.commands.addCommand(bringBack, {
      label: 'Bring Back Files from the Shared GPU',
      caption:
        "Copy what the remote kernel created or changed in its working folder into the notebook's folder (a file changed here meanwhile is kept, the kernel's copy goes beside it)",
      isEnabled: () => !!tracker.currentWidget?.sessionContext.session?.kernel,
      execute: async () => {
        const kernel = tracker.currentWidget?.sessionContext.session?.kernel;
        if (!kernel) {
          return;
        }
        const id = Notification.emit('Bringing back files…', 'in-progress', {
          autoClose: false
        });
        try {
          const answer = await requestAPI<{ message: string }>(
            'files',
            { method: 'POST', body: JSON.stringify({ kernel_id: kernel.id }) },
            app.serviceManager.serverSettings
          );
          Notification.update({
            id,
            message: answer.message,
            type: 'success',
            autoClose: 8000
          });
        } catch (error) {
          Notification.update({
            id,
            message: `Files did not come back: ${
              error instanceof Error ? error.message : String(error)
            }`,
            type: 'error',
            autoClose: false
          });
        }
      }
    });
    palette?.addItem({ command: bringBack, category: 'Shared GPU' });
    return gpus;
  }
};

/** The marketplace in the left sidebar, with "Use this GPU". */
const marketplace: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-gpu-share:marketplace',
  description:
    'A left-sidebar panel listing shared-GPU offers, with filters and "Use this GPU".',
  autoStart: true,
  requires: [IGPUShareModel, INotebookTracker, IDocumentManager],
  optional: [ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    model: IGPUShareModel,
    tracker: INotebookTracker,
    docManager: IDocumentManager,
    restorer: ILayoutRestorer | null
  ): void => {
    const useOffer = async (offer: GPUShare.IOffer): Promise<void> => {
      try {
        let panel: NotebookPanel | null = tracker.currentWidget;
        const choice = { offer_id: offer.id, gpu_model: offer.gpu_model };
        if (panel) {
          await panel.context.ready;
          await model.choose({ path: panel.context.path, ...choice });
          panel.model?.setMetadata('gpu_share', choice);
          await panel.sessionContext.changeKernel({ name: KERNEL_NAME });
        } else {
          const file = await app.serviceManager.contents.newUntitled({
            type: 'notebook',
            path: ''
          });
          await model.choose({ path: file.path, ...choice });
          const widget = docManager.open(file.path, 'Notebook', {
            name: KERNEL_NAME
          });
          panel = widget instanceof NotebookPanel ? widget : null;
          if (panel) {
            await panel.context.ready;
            panel.model?.setMetadata('gpu_share', choice);
          }
        }
        app.shell.activateById(panel?.id ?? '');
      } catch (error) {
        Notification.error(
          `Could not start a kernel on ${offer.gpu_model} at ${offer.host_id}: ${
            error instanceof Error ? error.message : String(error)
          }`,
          { autoClose: false }
        );
      }
    };
    const panel = new MarketplacePanel(model, useOffer);
    panel.id = 'jupyter-gpu-share-marketplace';
    panel.title.icon = gpuIcon;
    panel.title.caption = 'Shared GPUs';
    app.shell.add(panel, 'left', { rank: 600 });
    if (restorer) {
      restorer.add(panel, 'jupyter-gpu-share-marketplace');
    }
    app.commands.addCommand('gpu-share:open-marketplace', {
      label: 'Shared GPU Marketplace',
      icon: gpuIcon,
      execute: () => app.shell.activateById(panel.id)
    });
  }
};

/** Classes: a student's quota and class notebooks, a teacher's live dashboard. */
const classes: JupyterFrontEndPlugin<IGPUShareClasses> = {
  id: 'jupyter-gpu-share:classes',
  description:
    'A left-sidebar Classes panel: quotas and class notebooks to fetch for students, a live dashboard with stop buttons for teachers.',
  autoStart: true,
  provides: IGPUShareClasses,
  requires: [IGPUShareModel, IDocumentManager],
  optional: [ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    core: IGPUShareModel,
    docManager: IDocumentManager,
    restorer: ILayoutRestorer | null
  ): IGPUShareClasses => {
    const model = new ClassesModel(app.serviceManager.serverSettings);
    model.start(core.settings.pollInterval);
    core.settingsChanged.connect((_, settings) =>
      model.start(settings.pollInterval)
    );
    const fetchAndOpen = async (
      klass: GPUShare.IClass,
      notebook: string | null
    ) => {
      const result = await model.fetchNotebooks(klass.name);
      // The class kernel was just installed: the lab must know it before opening.
      await app.serviceManager.kernelspecs.refreshSpecs();
      if (app.commands.hasCommand('filebrowser:refresh')) {
        void app.commands.execute('filebrowser:refresh');
      }
      const fetched = result.fetched.length;
      Notification.success(
        `${klass.name}: ${fetched} notebook${fetched === 1 ? '' : 's'} fetched into ${result.folder}/` +
          (result.kept.length ? `, ${result.kept.length} of yours kept` : '') +
          `; kernel ${result.kernel_name} installed.`,
        { autoClose: 5000 }
      );
      if (notebook) {
        const widget = docManager.openOrReveal(`${result.folder}/${notebook}`);
        if (widget) {
          app.shell.activateById(widget.id);
        }
      }
    };
    const panel = new ClassesPanel(model, { fetchAndOpen });
    panel.id = 'jupyter-gpu-share-classes';
    panel.title.icon = classIcon;
    panel.title.caption = 'Classes';
    app.shell.add(panel, 'left', { rank: 610 });
    if (restorer) {
      restorer.add(panel, 'jupyter-gpu-share-classes');
    }
    app.commands.addCommand('gpu-share:open-classes', {
      label: 'Shared GPU Classes',
      icon: classIcon,
      execute: () => app.shell.activateById(panel.id)
    });
    return model;
  }
};

/** A launcher card for a new notebook on a shared GPU, with today's cheapest price. */
const launcher: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-gpu-share:launcher',
  description:
    'A launcher card "Shared GPU · from 0.60 cr/h" that opens a new notebook on the gpu-share kernel.',
  autoStart: true,
  requires: [IGPUShareModel],
  optional: [ILauncher],
  activate: (
    app: JupyterFrontEnd,
    model: IGPUShareModel,
    launcher: ILauncher | null
  ): void => {
    const command = 'gpu-share:new-notebook';
    app.commands.addCommand(command, {
      label: () => launcherLabel(model.offers),
      caption:
        'A new notebook whose kernel runs on a shared GPU (the cheapest free one unless you pick one in the marketplace)',
      execute: args =>
        app.commands.execute('notebook:create-new', {
          cwd: (args.cwd as string | undefined) ?? '',
          kernelName: KERNEL_NAME
        })
    });
    if (!launcher) {
      return;
    }
    const specs = app.serviceManager.kernelspecs;
    void specs.ready.then(() => {
      const spec = specs.specs?.kernelspecs[KERNEL_NAME];
      if (!spec) {
        return; // no gpu-share kernelspec on this server
      }
      const kernelIconUrl =
        spec.resources['logo-svg'] || spec.resources['logo-64x64'] || undefined;
      // The launcher draws labels when its items change: re-add the card when the label does.
      let label = '';
      let item: { dispose(): void } | null = null;
      const sync = () => {
        const next = launcherLabel(model.offers);
        if (next === label && item) {
          return;
        }
        label = next;
        item?.dispose();
        item = launcher.add({
          command,
          category: 'Notebook',
          rank: 1,
          kernelIconUrl
        });
      };
      model.offersChanged.connect(sync);
      sync();
    });
  }
};

/** The status-bar meter of the active notebook's remote kernel. */
const meter: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-gpu-share:meter',
  description:
    'A status-bar meter of the active notebook’s remote kernel: time, cost, credit.',
  autoStart: true,
  requires: [IGPUShareModel, INotebookTracker, INotebookGPUs, IStatusBar],
  optional: [IGPUShareClasses],
  activate: (
    app: JupyterFrontEnd,
    model: IGPUShareModel,
    tracker: INotebookTracker,
    gpus: INotebookGPUs,
    statusBar: IStatusBar,
    classes: IGPUShareClasses | null
  ): void => {
    const widget = new GPUMeter(model, tracker, gpus, classes);
    statusBar.registerStatusItem('jupyter-gpu-share:meter', {
      item: widget,
      align: 'left',
      rank: 5,
      isActive: () => widget.shown,
      activeStateChanged: gpus.changed
    });
  }
};

export default [core, notebooks, marketplace, launcher, classes, meter];
