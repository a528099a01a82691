import './base.css';
import './classes.css';
