import { Dialog, showDialog } from '@jupyterlab/apputils';
import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import type { Message } from '@lumino/messaging';
import * as React from 'react';

import {
  formatQuota,
  formatQuotaLeft,
  formatSeconds,
  quotaFraction,
  quotaLeftAt,
  scaleChart
} from './classes';
import { formatCredits } from './money';
import { GPUShare, IClassUsagePoint, IGPUShareClasses } from './tokens';

/** What the panel asks of the lab: open a fetched notebook (after fetching the class). */
export interface IClassActions {
  /** Fetch the class's notebooks and open `notebook` (a name in the class, or null). */
  fetchAndOpen(klass: GPUShare.IClass, notebook: string | null): Promise<void>;
}

/** Re-render every `ms` so that live figures tick between polls. */
function useTick(ms: number): number {
  const [now, setNow] = React.useState(Date.now());
  React.useEffect(() => {
    const timer = window.setInterval(() => setNow(Date.now()), ms);
    return () => window.clearInterval(timer);
  }, [ms]);
  return now;
}

function QuotaBar(props: { fraction: number | null }): JSX.Element | null {
  if (props.fraction === null) {
    return null;
  }
  const pct = Math.round(props.fraction * 100);
  return (
    <div
      className="jp-GPUShare-quotaBar"
      role="progressbar"
      aria-label="Quota used"
      aria-valuenow={pct}
      aria-valuemin={0}
      aria-valuemax={100}
    >
      <div
        className={`jp-GPUShare-quotaBar-fill${pct >= 90 ? ' jp-mod-warn' : ''}`}
        style={{ width: `${pct}%` }}
      />
    </div>
  );
}

/** A student's view of one class: quota left and the class notebooks. */
function StudentClass(props: {
  model: IGPUShareClasses;
  klass: GPUShare.IClass;
  actions: IClassActions;
}): JSX.Element {
  const { model, klass } = props;
  const now = useTick(1000);
  const [busy, setBusy] = React.useState<string | null>(null);
  const [message, setMessage] = React.useState<string | null>(null);
  const usage = model.usage(klass.name);
  const row = usage?.students[0] ?? null;
  const left = row
    ? quotaLeftAt(row, model.usagePolledAt(klass.name), now)
    : null;
  const notebooks = model.notebooks(klass.name);
  const fetch = async (notebook: string | null) => {
    setBusy(notebook ?? '*');
    setMessage(null);
    try {
      await props.actions.fetchAndOpen(klass, notebook);
    } catch (error) {
      setMessage(error instanceof Error ? error.message : String(error));
    } finally {
      setBusy(null);
    }
  };
  return (
    <>
      <dl className="jp-GPUShare-class-facts">
        <dt>Quota left</dt>
        <dd aria-label={`Quota left in ${klass.name}`}>
          {formatQuotaLeft(left)}
        </dd>
        <dt>Used</dt>
        <dd>
          {row
            ? `${formatSeconds(row.seconds)} · ${formatCredits(row.credits_micro)} credits`
            : '–'}
        </dd>
        <dt>Kernel</dt>
        <dd>{row && row.running.length ? 'running' : 'none'}</dd>
      </dl>
      {left && <QuotaBar fraction={quotaFraction(left, klass)} />}
      <h4 className="jp-GPUShare-class-sub">Class notebooks</h4>
      {notebooks.length === 0 ? (
        <p className="jp-GPUShare-empty">No notebook published yet.</p>
      ) : (
        <ul
          className="jp-GPUShare-class-notebooks"
          aria-label={`Notebooks of ${klass.name}`}
        >
          {notebooks.map(nb => (
            <li key={nb.name} aria-label={nb.name}>
              <span className="jp-GPUShare-class-nb">{nb.name}</span>
              <button
                className="jp-mod-styled jp-mod-accept"
                disabled={busy !== null}
                title={`Download into ${klass.name}/ (your copy is kept if you have one) and open`}
                onClick={() => void fetch(nb.name)}
              >
                {busy === nb.name ? 'Fetching…' : 'Fetch'}
              </button>
            </li>
          ))}
        </ul>
      )}
      {message && (
        <div className="jp-GPUShare-error" role="alert">
          {message}
        </div>
      )}
      <p className="jp-GPUShare-note">
        Kernels of class notebooks run on the class GPUs ({klass.kernel_name}),
        charged to the class, not to your credit.
      </p>
    </>
  );
}

/** A small SVG line chart of a class's use over time. */
export function UsageChart(props: {
  series: ReadonlyArray<IClassUsagePoint>;
  measure: 'seconds' | 'micro';
  width?: number;
  height?: number;
}): JSX.Element {
  const width = props.width ?? 260;
  const height = props.height ?? 80;
  const values = props.series.map(p =>
    props.measure === 'seconds' ? p.seconds : p.micro
  );
  const chart = scaleChart(
    props.series.map(p => p.t),
    values,
    width,
    height
  );
  const top =
    props.measure === 'seconds'
      ? formatSeconds(chart.yMax)
      : `${formatCredits(chart.yMax)} cr`;
  const span = chart.tMax - chart.tMin;
  return (
    <figure className="jp-GPUShare-chart">
      <svg
        width="100%"
        height={height}
        viewBox={`0 0 ${width} ${height}`}
        preserveAspectRatio="none"
        role="img"
        aria-label={`Class use over time (${props.measure === 'seconds' ? 'GPU time' : 'credits'})`}
      >
        <line
          className="jp-GPUShare-chart-axis"
          x1={4}
          y1={height - 4}
          x2={width - 4}
          y2={height - 4}
        />
        <line
          className="jp-GPUShare-chart-axis"
          x1={4}
          y1={4}
          x2={4}
          y2={height - 4}
        />
        {chart.path && (
          <path className="jp-GPUShare-chart-line" d={chart.path} />
        )}
      </svg>
      <figcaption>
        <span>top: {top}</span>
        <span>
          {span > 0 ? `last ${formatSeconds(span / 1000)}` : 'collecting…'}
        </span>
      </figcaption>
    </figure>
  );
}

/** The teacher's live dashboard of one class. */
export function TeacherDashboard(props: {
  model: IGPUShareClasses;
  klass: GPUShare.IClass;
}): JSX.Element {
  const { model, klass } = props;
  const now = useTick(1000);
  const [measure, setMeasure] = React.useState<'seconds' | 'micro'>('seconds');
  const [stopping, setStopping] = React.useState<string | null>(null);
  const [message, setMessage] = React.useState<string | null>(null);
  const usage = model.usage(klass.name);
  const polledAt = model.usagePolledAt(klass.name);
  const rows = usage?.students ?? [];
  const running = rows.filter(r => r.running.length > 0).length;
  const stop = async (student: string) => {
    const answer = await showDialog({
      title: `Stop ${student}'s kernel?`,
      body: `The running kernel of ${student} in ${klass.name} is shut down now; unsaved work in it is lost.`,
      buttons: [
        Dialog.cancelButton(),
        Dialog.warnButton({ label: 'Stop kernel' })
      ]
    });
    if (!answer.button.accept) {
      return;
    }
    setStopping(student);
    setMessage(null);
    try {
      const stopped = await model.stopStudent(klass.name, student);
      setMessage(
        stopped.length
          ? `Stopped ${student}'s kernel.`
          : `${student} had no running kernel.`
      );
    } catch (error) {
      setMessage(error instanceof Error ? error.message : String(error));
    } finally {
      setStopping(null);
    }
  };
  return (
    <div
      className="jp-GPUShare-dashboard"
      aria-label={`Dashboard of ${klass.name}`}
    >
      <dl className="jp-GPUShare-class-facts">
        <dt>Budget left</dt>
        <dd aria-label={`Budget left in ${klass.name}`}>
          {usage && usage.budget_micro !== null
            ? `${formatCredits(usage.budget_micro)} credits`
            : `${formatCredits(klass.budget_micro)} credits`}
        </dd>
        <dt>Quota</dt>
        <dd>{formatQuota(klass)}</dd>
        <dt>Students</dt>
        <dd>
          {rows.length} · {running} running
        </dd>
        {klass.gpu_model && (
          <>
            <dt>GPU</dt>
            <dd>{klass.gpu_model}</dd>
          </>
        )}
      </dl>
      <div className="jp-GPUShare-chart-head">
        <span>Use over time</span>
        <select
          className="jp-mod-styled"
          aria-label="Chart measure"
          value={measure}
          onChange={e => setMeasure(e.target.value as 'seconds' | 'micro')}
        >
          <option value="seconds">GPU time</option>
          <option value="micro">Credits</option>
        </select>
      </div>
      <UsageChart series={model.series(klass.name)} measure={measure} />
      <div className="jp-GPUShare-table-wrap">
        <table
          className="jp-GPUShare-students"
          aria-label={`Students of ${klass.name}`}
        >
          <thead>
            <tr>
              <th>Student</th>
              <th title="GPU time used">GPU time</th>
              <th>Credits</th>
              <th title="Sessions">Sess.</th>
              <th>Kernel</th>
              <th>Quota left</th>
              <th />
            </tr>
          </thead>
          <tbody>
            {rows.map(row => {
              const live = row.running.length > 0;
              return (
                <tr
                  key={row.student}
                  aria-label={`Student ${row.student}`}
                  data-student={row.student}
                  data-running={live ? 'yes' : 'no'}
                >
                  <td>{row.student}</td>
                  <td>{formatSeconds(row.seconds)}</td>
                  <td>{formatCredits(row.credits_micro)}</td>
                  <td>{row.sessions}</td>
                  <td className={live ? 'jp-GPUShare-running' : ''}>
                    {live ? 'yes' : 'no'}
                  </td>
                  <td>{formatQuotaLeft(quotaLeftAt(row, polledAt, now))}</td>
                  <td>
                    {live && (
                      <button
                        className="jp-mod-styled jp-mod-warn jp-GPUShare-stop"
                        disabled={stopping !== null}
                        title={`Stop ${row.student}'s running kernel`}
                        aria-label={`Stop ${row.student}`}
                        onClick={() => void stop(row.student)}
                      >
                        {stopping === row.student ? '…' : 'Stop'}
                      </button>
                    )}
                  </td>
                </tr>
              );
            })}
          </tbody>
        </table>
      </div>
      {rows.length === 0 && (
        <p className="jp-GPUShare-empty">No student yet.</p>
      )}
      {message && (
        <div className="jp-GPUShare-class-message" role="status">
          {message}
        </div>
      )}
      <div className="jp-GPUShare-updated">
        {polledAt
          ? `updated ${Math.max(0, Math.round((now - polledAt) / 1000))} s ago`
          : 'loading…'}
      </div>
    </div>
  );
}

function ClassCard(props: {
  model: IGPUShareClasses;
  klass: GPUShare.IClass;
  actions: IClassActions;
}): JSX.Element {
  const { klass } = props;
  const teaching = klass.your_role === 'teacher' || klass.your_role === 'admin';
  return (
    <li
      className="jp-GPUShare-class"
      aria-label={`Class ${klass.name}`}
      data-class={klass.name}
    >
      <div className="jp-GPUShare-offer-head">
        <span className="jp-GPUShare-offer-model">{klass.name}</span>
        <span className="jp-GPUShare-badge jp-GPUShare-badge-role">
          {teaching ? 'teacher' : 'student'}
        </span>
      </div>
      {!teaching && (
        <div className="jp-GPUShare-class-teacher">
          taught by {klass.teacher}
        </div>
      )}
      {teaching ? (
        <TeacherDashboard model={props.model} klass={klass} />
      ) : (
        <StudentClass
          model={props.model}
          klass={klass}
          actions={props.actions}
        />
      )}
    </li>
  );
}

function Classes(props: {
  model: IGPUShareClasses;
  actions: IClassActions;
}): JSX.Element {
  const { model } = props;
  return (
    <div className="jp-GPUShare-classes">
      <header className="jp-GPUShare-header">
        <h2>Classes</h2>
      </header>
      <UseSignal signal={model.changed}>
        {() => (
          <>
            {model.error && (
              <div className="jp-GPUShare-error" role="alert">
                {model.error}
              </div>
            )}
            {model.classes.length === 0 && !model.error && (
              <p className="jp-GPUShare-empty">You are not in any class.</p>
            )}
            <ul className="jp-GPUShare-class-list" aria-label="Your classes">
              {model.classes.map(klass => (
                <ClassCard
                  key={klass.name}
                  model={model}
                  klass={klass}
                  actions={props.actions}
                />
              ))}
            </ul>
          </>
        )}
      </UseSignal>
    </div>
  );
}

/** The left-sidebar Classes panel; the model polls every class while it is shown. */
export class ClassesPanel extends ReactWidget {
  constructor(model: IGPUShareClasses, actions: IClassActions) {
    super();
    this._model = model;
    this._actions = actions;
    this.addClass('jp-GPUShare-panel');
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._model.active = true;
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this._model.active = false;
  }

  protected render(): JSX.Element {
    return <Classes model={this._model} actions={this._actions} />;
  }

  private _model: IGPUShareClasses;
  private _actions: IClassActions;
}
