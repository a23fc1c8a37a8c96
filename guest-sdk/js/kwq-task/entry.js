// The module componentize-js builds: the host's context and inputs go to the SDK,
// and the task in src/task.js becomes the `kwq:task/task` export.
// Written by `kwq new`; you do not need to edit it.
import * as context from 'kwq:task/context@0.2.0';
import * as inputs from 'kwq:task/inputs@0.2.0';
import * as module from '../src/task.js';
import { component } from './index.js';

export const task = component(context, module, inputs);
