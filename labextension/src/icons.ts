import { LabIcon } from '@jupyterlab/ui-components';

import gpuSvg from '../style/icons/gpu.svg';

export const gpuIcon = new LabIcon({
  name: 'jupyter-gpu-share:gpu',
  svgstr: gpuSvg
});

import classSvg from '../style/icons/class.svg';

export const classIcon = new LabIcon({
  name: 'jupyter-gpu-share:class',
  svgstr: classSvg
});
